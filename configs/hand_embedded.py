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
  # configs/embedded.py's reasons hold here: a narrow one-block-per-stage
  # ResNet trained from scratch, one head, narrow stages, no dropout or joint
  # masking, the renders' own variety instead of METRO's augmentations, a
  # from-scratch lr with a linear decay, whole-batch BatchNorm.
  config = hand_r50.make_hand(embedded.get_config(), 'coarsemetro')
  config.model.upsample_init = 'random'  # the hand network has no learned up-sampling
  # The camera head starts at the synthetic hands' weak-perspective scale (s of
  # the labels: 7-14, median 10; the wrist is near the crop centre on average).
  config.model.cam_bias_init = (10.0, 0.0, 0.0)
  config.eval_flip = False
  config.mirror_left_hands = True
  config.loss.joints_3d_pa = 0.0
  config.data.synthetic.image_size = 128
  config.data.synthetic.num_train = 10_000
  config.data.synthetic.num_test = 500
  config.optim.lr = 1e-3
  config.num_epochs = 1
  config.num_train_steps = 2_000
  config.log_every_steps = 100
  config.eval_every_steps = 1_000
  config.checkpoint_every_steps = 1_000
  return config
