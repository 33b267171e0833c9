"""CoarseMETRO-S with a ResNet-50 backbone: the paper's recipe (Sec. 3-4, 6).

  python main.py --config=configs/r50.py --workdir=runs/r50 \
      --config.data.train_yaml=/data/Tax-H36m-coco40k-Muco-UP-Mpii/train.yaml \
      --config.data.eval_yaml=/data/human3.6m/valid.protocol2.yaml \
      --config.body_model.path=/data/smpl/basicModel_neutral_lbs_10_207_0_v1.0.0.pkl \
      --config.body_model.h36m_regressor=/data/smpl/J_regressor_h36m_correct.npy \
      --config.topology.hierarchy=/data/smpl/mesh_downsampling.npz \
      --config.init_from=runs/resnet50_imagenet

Paper numbers (Human3.6M P2): PA-MPJPE 38.7, MPJPE 54.6; transformer 11.6M
params, 0.6 GFLOPs, 4.5M activations (Table 1).
"""

import ml_collections


def get_config():
  """The paper's CoarseMETRO-S-R50 recipe."""
  config = ml_collections.ConfigDict()
  config.seed = 88

  # ---------------------------------------------------------------- model
  config.model = ml_collections.ConfigDict()
  config.model.name = 'coarsemetro'  # 'coarsemetro' | 'fastmetro'
  # The hand network of either model (configs/hand_r50.py): 21 joints, the
  # 778 / 195 hand hierarchy, fixed 195 -> 778 up-sampling.
  config.model.hand = False
  config.model.backbone = 'resnet50'  # 'resnet50' | 'resnet' | 'hrnet'
  # Used when backbone == 'resnet' (a narrower/shallower ResNet for CPU runs).
  config.model.resnet_depths = (3, 4, 6, 3)
  config.model.resnet_width = 64
  # torchvision's zero_init_residual (False there and in FastMETRO): resnet50
  # and resnet only; irrelevant when init_from loads ImageNet weights.
  config.model.resnet_zero_init_residual = False
  config.model.hrnet_width = 64  # HRNet-W{32,48,64}
  config.model.backbone_remat = False  # rematerialise backbone blocks
  config.model.num_joints = 14
  config.model.num_heads = 8
  config.model.dropout = 0.1
  config.model.compute_dtype = 'float32'  # 'float32' | 'bfloat16'
  # CoarseMETRO. The paper fixes D = 512 for the image tokens, 8 heads, one
  # encoder + one decoder block per stage and 48/192/384 vertex tokens; it does
  # not give the later stages' widths. Following FastMETRO's progressive width
  # reduction (512 -> 128, FFN = 4 x width), widths 512 -> 128 -> 64 with FFN
  # 2048/512/256 are the closest match to Table 1 among the widths profiled
  # (python -m coarsemetro_jax.profile): 11.35M non-backbone params (paper
  # 11.6M), 0.63 GFLOPs (0.6G) and 4.52M activations (4.5M). Keeping 512 in
  # every stage would give 27.3M / 3.85 GFLOPs / 9.4M.
  config.model.stage_dims = (512, 128, 64)
  config.model.stage_ffn_dims = (2048, 512, 256)
  config.model.vertex_tokens = (48, 192, 384)
  config.model.vertex_attention = 'end'  # 'none' | 'beginning' | 'end' (Table 3)
  # The paper's decoder cross-attends to "the output image and camera
  # features"; FastMETRO's decoder sees the image features only.
  config.model.memory_includes_cam = True
  config.model.joint_mask_ratio = 0.2  # max fraction of masked joint tokens
  config.model.joint_mask_value = 0.01  # METRO's constant for masked tokens
  # Start of the learned 431 -> 1723 up-sampling: 'random' (nn.Linear, as
  # FastMETRO and the paper) or 'hierarchy' (the mesh hierarchy's U^T).
  config.model.upsample_init = 'random'
  # FastMETRO's SMPL-parameter head on the 1723 mesh (pred_rotmat, pred_betas,
  # smpl_* eval metrics); released weights convert as the -smplparam kinds.
  config.model.smpl_param_regressor = False
  # FastMETRO (configs/fastmetro.py).
  config.model.fastmetro_layers = 1  # S=1, M=2, L=3 per transformer
  config.model.fastmetro_dims = (512, 128)
  config.model.fastmetro_ffn_dims = (2048, 512)

  # ------------------------------------------------------ body and topology
  config.topology = ml_collections.ConfigDict()
  config.topology.hierarchy = ''  # '' = embedded body
  config.topology.adjmat_prefix = ''  # FastMETRO smpl_431_adjmat prefix
  config.body_model = ml_collections.ConfigDict()
  config.body_model.path = ''  # '' = embedded body; SMPL .pkl
  config.body_model.h36m_regressor = ''  # J_regressor_h36m_correct.npy

  # ----------------------------------------------------------------- data
  # METRO-format data (data_pipelines/input_pipeline.py). This recipe needs
  # train_yaml and eval_yaml (or source='tfds'); source='synthetic' runs it on
  # the synthetic dataset below instead.
  config.data = ml_collections.ConfigDict()
  config.data.source = 'tsv'  # 'tsv' (METRO yamls) | 'tfds' | 'synthetic'
  config.data.train_yaml = ''
  config.data.eval_yaml = ''
  # source='tfds': a build of data_pipelines/tfds_metro.py (may be gs://).
  config.data.tfds_data_dir = ''
  config.data.tfds_train_split = 'train'
  config.data.tfds_eval_split = 'validation'
  config.data.image_size = 224
  # Hand rows (FreiHAND's 21 joints, MANO; data_pipelines/__init__.py): one
  # value shared with config.model.hand, so setting either sets both.
  config.data.hand = config.model.get_ref('hand')
  config.data.image_dtype = 'float32'  # 'float32' | 'bfloat16'
  # How image and 2D joints are cropped: 'metro' (the released METRO/FastMETRO
  # crop: integer box, cv2.resize, truncated keypoints) or 'continuous' (one
  # exact affine for image and joints; data_pipelines/augment.py).
  # Evaluation (r50, h64, fastmetro): 'metro', so converted checkpoints get the
  # released evaluation's inputs bit for bit; training: 'continuous', a quarter
  # of 'metro''s CPU time, image and joints exactly aligned (python -m
  # benchmarks.crop_difference compares the two).
  config.data.crop = 'metro'
  config.data.train_crop = 'continuous'
  config.data.batch_size = 64  # global: 16 per GPU x 4 in the paper
  config.data.eval_batch_size = 64  # global; padded with mask=0
  # METRO/GraphCMR augmentation: sc ~ clip(N(1, f), 1 +- f), rotation
  # clip(N(0, f), +-2f) degrees (0 with p=0.6), colour noise U[1 +- f].
  config.data.scale_factor = 0.25
  config.data.rot_factor = 30.0
  config.data.noise_factor = 0.4
  config.data.num_parallel_calls = -1  # decode/augment threads; -1 = auto
  config.data.shuffle = True  # False: rows in file order (tests)
  config.data.shuffle_buffer = 10_000  # TFDS TFRecord builds only (tsv, ArrayRecord: all rows)
  config.data.prefetch = 2  # batches
  config.data.device_prefetch = 2  # train batches put on devices ahead by a thread
  config.data.max_bad_fraction = 0.01  # skipped rows before failing
  # The synthetic dataset rendered from the body model (data_pipelines/
  # synthetic): generated on first use and cached under `dir`, in a directory
  # keyed by these generation parameters, so no run overwrites another's.
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.dir = 'data/synthetic'  # one subdirectory per set of parameters
  config.data.synthetic.num_train = 10_000
  config.data.synthetic.num_test = 1_000
  config.data.synthetic.seed = 0
  config.data.synthetic.image_size = 256
  config.data.synthetic.workers = 0  # 0 = all cores

  # ------------------------------------------------------------- training
  config.init_from = ''  # converted checkpoint dir ('' = scratch)
  config.num_epochs = 60
  config.num_train_steps = -1  # > 0 overrides num_epochs
  config.log_every_steps = 100
  config.eval_every_steps = -1  # -1 = every epoch (FastMETRO)
  config.eval_max_batches = 0  # periodic evals only; 0 = whole set
  config.checkpoint_every_steps = 2_000
  config.keep_checkpoints = 3
  # Test-time flip: average with the un-mirrored prediction of the mirrored
  # image (coarsemetro_jax/mirror.py). Not in the paper's protocol.
  config.eval_flip = False
  config.num_eval_images = 8  # predicted meshes in the picture (0: none)

  # ----------------------------------------------------------------- loss
  # L_total of the paper (Sec. 3.3) with FastMETRO's weights and
  # normalisations (coarsemetro_jax/losses.py); `--vertices_*_loss_weight`,
  # `--joints_*_loss_weight`, `--edge_*_loss_weight` of FastMETRO.
  config.loss = ml_collections.ConfigDict()
  config.loss.joints_3d = 1000.0  # token + mesh J14, L1
  config.loss.vertices = 100.0
  config.loss.vertices_coarse = 0.25  # 431
  config.loss.vertices_intermediate = 0.5  # 1723
  config.loss.vertices_fine = 0.25  # 6890
  config.loss.joints_3d_pa = 0.0  # mesh J14 after Procrustes, L1 (not in the paper)
  config.loss.joints_2d = 100.0  # token + mesh J14 re-projection, L1
  config.loss.use_has_2d_joints = False  # FastMETRO gates 2D by visibility only
  # Edge-length/normal terms on the 1723 mesh: in FastMETRO's code, not in
  # either paper (FastMETRO issue #7); True for FastMETRO recipes.
  config.loss.use_edge_normal = False
  config.loss.edge_normal = 100.0
  config.loss.edge_gt = 5.0
  config.loss.edge_self = 1e-4
  config.loss.normal = 0.1
  # With the head: smpl_param x L_smpl + smpl_param_usual x the loss above
  # (smpl_param_loss.py); FastMETRO's weights (its 3DPW fine-tuning: usual 1).
  config.loss.smpl_param = 1000.0
  config.loss.smpl_param_usual = 1e-8

  # ------------------------------------------------------------ optimiser
  # AdamW + global-norm clipping (paper Sec. 4; coarsemetro_jax/steps.py).
  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-4
  config.optim.backbone_lr_mult = 1.0  # FastMETRO: one group, same lr
  config.optim.upsample_lr_mult = 1.0  # lr multiplier of coarse2intermediate_upsample
  # The other non-backbone parameters. With the SMPL-parameter head, all three
  # at 0 train the head alone on a frozen network.
  config.optim.rest_lr_mult = 1.0
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.weight_decay = 1e-4  # decoupled, on every parameter
  config.optim.grad_clip_norm = 0.3  # global norm; 0 = no clipping
  # Step decay every N epochs (0 = constant lr). FastMETRO's StepLR(100) never
  # fires in its 60 epochs, so the paper's lr is constant.
  config.optim.lr_drop_epochs = 0
  config.optim.lr_drop_factor = 0.1
  # 'step' (the above) | 'cosine' | 'linear': a linear warm-up over
  # warmup_steps, then a cosine or a straight decay to 0 at the last step.
  config.optim.schedule = 'step'
  config.optim.warmup_steps = 0  # 'cosine' and 'linear' only

  # ----------------------------------------------------- train-step layout
  # BatchNorm statistics over groups of this many examples (0 = the global
  # batch, i.e. SyncBN). 16 = PyTorch DDP without SyncBN at 16 images per GPU,
  # the paper's training; independent of how many devices run it.
  config.bn_group_size = 16
  # 'replicated' or 'fsdp' (arrays of >= fsdp_min_size elements, params and
  # optimiser state, sharded over the 'data' axis on their largest divisible
  # dimension).
  config.param_sharding = 'replicated'
  config.fsdp_min_size = 2**18
  return config
