"""Input data for CoarseMETRO / FastMETRO: METRO TSV datasets -> global batches.

Modules (this package imports none of them, so `metro_tsv` and `augment` stay
usable without TensorFlow):
  metro_tsv       METRO TSV/yaml/.lineidx writer and reader, label parsing
                  (NumPy).
  augment         METRO/GraphCMR crop, scale, rotation, flip, colour parameters
                  and the joint/pose transforms (NumPy + OpenCV).
  input_pipeline  tf.data per host: create_train_dataset, create_eval_dataset,
                  to_global_batch, global_batches.
  examples        one row -> one prepared example (decode, crop, augment),
                  run by input_pipeline through tf.numpy_function.
  ordering        the global order of training rows and each process's share
                  of every global batch (NumPy).
  prefetch        BackgroundIterator: the training batches, fetched ahead.
  bad_rows        counts, logs and limits the rows a pipeline skips.
  datasets        a run's data from config.data (tsv, tfds or synthetic).
  tfds_metro      TFDS builder (`Metro`) that stores a METRO dataset as
                  ArrayRecord (default) or TFRecord shards; config.data.source
                  = 'tfds' reads it.
  synthetic/      embedded-body and embedded-hand synthetic dataset writer
                  (same TSV format).

Batch dict (every pipeline, every source; B = host-local batch until
`to_global_batch` makes it global; S = config.data.image_size):
  image          [B, S, S, 3] float32 (bfloat16 with config.data.image_dtype):
                 RGB crop, ImageNet-normalised ((x / 255 - mean) / std).
  joints_2d      [B, 24, 3] float32, J24 order: x, y normalised to [-1, 1] in
                 the crop (2 * px / S - 1, px the continuous crop coordinate, so
                 the crop borders are -1 and 1), then visibility.
  joints_3d      [B, 24, 4] float32, J24 order: x, y, z metres in the camera
                 frame (x right, y down, z away), root-centred at the J24 pelvis
                 (index 14), then confidence.
  pose           [B, 72] float32 SMPL axis-angle; global orientation in the
                 camera frame (turned and flipped with the image).
  betas          [B, 10] float32 SMPL shape.
  has_2d_joints, has_3d_joints, has_smpl
                 [B] float32 in {0, 1}: which supervision the example carries.
  mask           [B] float32: 1 for real examples, 0 for eval padding and, in
                 training, for a bad row that keeps its slot (all-zero fields).

Hand batch dict (`config.data.hand`, one value with config.model.hand: METRO's
FreiHAND rows; joints in FreiHAND's order, `hand_model.HAND_JOINT_NAMES`:
wrist, thumb 1-4, index 1-4, middle 1-4, ring 1-4, pinky 1-4). The same keys
and conventions as the body's, except:
  joints_2d      [B, 21, 3] float32.
  joints_3d      [B, 21, 4] float32, root-centred at the wrist (joint 0), as
                 METRO's hand dataset.
  pose           [B, 48] float32 MANO axis-angle, global orientation in the
                 camera frame (turned with the image).
  betas          [B, 10] float32 MANO shape.
  has_smpl       [B]: the example has MANO parameters.
  is_left        [B] float32 in {0, 1}: a left hand, whose pose and betas drive
                 the mirrored hand model: its vertices are
                 forward(hand_model.mirror(hand), pose, betas) =
                 forward(hand, hand_model.mirror_pose(pose), betas) * (-1, 1, 1).
                 FreiHAND has right hands only (0); the synthetic hands are
                 half left.
Training augments hands as METRO's hand training (scale, rotation by
config.data.rot_factor (METRO's hand value is 90), colour noise) and never
flips them.
"""
