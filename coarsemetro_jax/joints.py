"""Joint tables shared by the model, the data pipeline, losses and metrics.

Orders and index maps are those of the METRO/FastMETRO code base
(`src/modeling/data/config.py`), so labels and checkpoints from the PyTorch
projects are used unchanged.
"""

# The 24 joints of METRO-format labels (`2d_joints`, `3d_joints`).
J24_NAMES = (
    'R_Ankle',
    'R_Knee',
    'R_Hip',
    'L_Hip',
    'L_Knee',
    'L_Ankle',
    'R_Wrist',
    'R_Elbow',
    'R_Shoulder',
    'L_Shoulder',
    'L_Elbow',
    'L_Wrist',
    'Neck',
    'Top_of_Head',
    'Pelvis',
    'Thorax',
    'Spine',
    'Jaw',
    'Head',
    'Nose',
    'L_Eye',
    'R_Eye',
    'L_Ear',
    'R_Ear',
)
J24_PELVIS = 14
# Left/right swap applied to J24 joints when an image is flipped.
J24_FLIP_PERM = (
    5,
    4,
    3,
    2,
    1,
    0,
    11,
    10,
    9,
    8,
    7,
    6,
    12,
    13,
    14,
    15,
    16,
    17,
    18,
    19,
    21,
    20,
    23,
    22,
)

# The 14 evaluation joints; also the order of the model's joint tokens.
J14_NAMES = (
    'R_Ankle',
    'R_Knee',
    'R_Hip',
    'L_Hip',
    'L_Knee',
    'L_Ankle',
    'R_Wrist',
    'R_Elbow',
    'R_Shoulder',
    'L_Shoulder',
    'L_Elbow',
    'L_Wrist',
    'Neck',
    'Head',
)
NUM_JOINTS = len(J14_NAMES)
J24_TO_J14 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18)
# Left/right swap of J14 joints (J24_FLIP_PERM restricted to J24_TO_J14).
J14_FLIP_PERM = tuple(J24_TO_J14.index(J24_FLIP_PERM[j]) for j in J24_TO_J14)
# Token joints and metrics are re-centred at the midpoint of the two hips.
J14_R_HIP, J14_L_HIP = 2, 3

# Human3.6M 17 joints, regressed from the mesh with `J_regressor_h36m`.
H36M_J17_NAMES = (
    'Pelvis',
    'R_Hip',
    'R_Knee',
    'R_Ankle',
    'L_Hip',
    'L_Knee',
    'L_Ankle',
    'Torso',
    'Neck',
    'Nose',
    'Head',
    'L_Shoulder',
    'L_Elbow',
    'L_Wrist',
    'R_Shoulder',
    'R_Elbow',
    'R_Wrist',
)
H36M_PELVIS = 0
H36M_J17_TO_J14 = (3, 2, 1, 4, 5, 6, 16, 15, 14, 11, 12, 13, 8, 10)

# SMPL's 24-joint kinematic tree (parent of each joint; -1 for the root).
SMPL_PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21)
SMPL_JOINT_NAMES = (
    'pelvis',
    'left_hip',
    'right_hip',
    'spine1',
    'left_knee',
    'right_knee',
    'spine2',
    'left_ankle',
    'right_ankle',
    'spine3',
    'left_foot',
    'right_foot',
    'neck',
    'left_collar',
    'right_collar',
    'head',
    'left_shoulder',
    'right_shoulder',
    'left_elbow',
    'right_elbow',
    'left_wrist',
    'right_wrist',
    'left_hand',
    'right_hand',
)
NUM_SMPL_JOINTS = len(SMPL_PARENTS)
NUM_BETAS = 10
# Left/right swap of SMPL joints for flipping a pose (METRO/SPIN `flip_pose`:
# swap the joint triplets, then negate the y and z axis-angle components).
SMPL_FLIP_PERM = (
    0,
    2,
    1,
    3,
    5,
    4,
    6,
    8,
    7,
    9,
    11,
    10,
    12,
    14,
    13,
    15,
    17,
    16,
    19,
    18,
    21,
    20,
    23,
    22,
)
