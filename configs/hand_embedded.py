"""The embedded hand: CoarseMETRO-Hand on synthetic CC0 hands, sized for a 2-core CPU.

  python main.py --config=configs/hand_embedded.py --workdir=runs/hand_embedded

On first use it renders the synthetic hands (data_pipelines/synthetic, right
and left hands in METRO's FreiHAND TSV format), then trains and evaluates
through the same code path as the hand recipe (configs/hand_r50.py): the same
CoarseMETRO-Hand structure (21 joint tokens, three coarse-to-fine stages of
vertex tokens, 195 -> 778 up-sampling), hand loss, metrics and checkpoints,
with configs/embedded.py's narrow ResNet, small crops and narrow stages. The
final evaluation prints PA-MPJPE / PA-MPVPE / F@5 mm / F@15 mm on the held-out
split next to a mean-pose baseline (the training set's Procrustes-mean hand,
mirrored for left hands), and writes a picture of predicted hands over test
images into the workdir.
"""

from configs import embedded
from configs import hand_r50


def get_config():
  """CPU-sized CoarseMETRO-Hand on the embedded synthetic hands."""
  # configs/embedded.py's choices hold here too: a narrow one-block-per-stage
  # ResNet trained from scratch on 96-px crops, one head, narrow stages, no
  # dropout or joint masking, the renders' own variety instead of METRO's
  # augmentations, lr 1e-3 (backbone x 3) with warm-up and a linear decay,
  # whole-batch BatchNorm, batch 32.
  body = embedded.get_config()
  config = hand_r50.make_hand(embedded.get_config(), 'coarsemetro')
  # make_hand sets the FreiHAND fine-tuning schedule (lr 1e-4) and METRO's hand
  # rotations; a run from scratch keeps the embedded body's lr 1e-3 (at 1e-4
  # it stayed at the mean hand), and the renders already cover every
  # orientation.
  config.optim.lr = body.optim.lr
  config.data.rot_factor = body.data.rot_factor
  config.model.upsample_init = 'random'  # the hand network has no learned up-sampling
  # The camera head starts at the synthetic hands' weak-perspective scale (the
  # labels' s: 7-14, median 10; the wrist is near the crop centre on average).
  # From 0, Adam's lr-sized steps had not reached it after 1,500 steps: the
  # projected hands were a fraction of the real ones and the 2D loss pulled
  # the 3D joints apart.
  config.model.cam_bias_init = (10.0, 0.0, 0.0)
  # Half the synthetic hands are left hands: a network this
  # small could not tell the sides apart and predicted a flat hand between
  # them (its PA-MPVPE was the same for its mesh and that mesh mirrored). The
  # side is known (as a hand detector gives it, and as the mean-pose baseline
  # is told it), so left hands are mirrored into right ones.
  config.mirror_left_hands = True
  # The metric aligns rotation and scale away, and the global orientation
  # (palm or back within 60 degrees of the view axis, fingers up within 60
  # degrees of the image's up direction, in these renders) is the hardest
  # part to learn:
  # Procrustes-aligned joint and vertex losses reward the articulation itself,
  # and the camera-frame joint loss gets a tenth of FastMETRO's weight.
  config.loss.joints_3d = 100.0
  config.loss.joints_3d_pa = 3000.0
  config.loss.vertices_pa = 3000.0
  # A right-hand network sees a left hand in the mirrored image.
  config.eval_flip = False
  config.data.synthetic.num_train = 10_000
  config.data.synthetic.num_test = 500
  config.data.synthetic.image_size = 128  # stored crops; decoded every step
  config.num_epochs = 1
  config.num_train_steps = 2_400
  config.log_every_steps = 100
  config.eval_every_steps = 800
  config.eval_max_batches = 4
  config.checkpoint_every_steps = 800
  return config
