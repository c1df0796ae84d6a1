"""The compiler passes of cofx, in the order `cofx.convert` runs them.

Analysis passes write ``node.meta`` the way ``torch.fx.passes.shape_prop`` does;
the rewrite pass builds the continual graph from what they wrote.
"""
from .frame_sizes import frame_sizes_as_numbers
from .inplace_as_functional import inplace_as_functional
from .diff_as_slices import diff_as_slices
from .im2col_as_unfold import im2col_as_unfold
from .stft_as_frames import stft_as_frames
from .unfold_as_slices import unfold_as_slices
from .views_collapsed import views_collapsed
from .values_only import values_only
from .lp_pool_as_avg import lp_pool_as_avg
from .negative_pads import negative_pads_as_crops
from .shape_runs import record_runs
from .batch_views import name_view_batches
from .outputs_unpacked import outputs_unpacked
from .stacked_frames import stacked_frames
from .zeros_as_pad import zeros_as_pad
from .reduce_before_view import reduce_before_view
from .matmul_before_view import matmul_before_view
from .interpolate_frames import frames_resized_alone
from .layout import label_layouts
from .length_values import mark_length_values
from .node_kind import classify_nodes
from .fold_crops import fold_crops
from .framewise_check import check_causal, check_framewise
from .receptive_field import annotate_timing
from .select_kernels import select_kernels
from .fold_batchnorm import mark_batchnorm_folds
from .continualize import build_step_graph
from .read_rows import newest_rows, read_rows

__all__ = ["frame_sizes_as_numbers", "inplace_as_functional", "diff_as_slices", "im2col_as_unfold", "stft_as_frames", "unfold_as_slices", "views_collapsed", "values_only", "lp_pool_as_avg", "negative_pads_as_crops", "record_runs", "name_view_batches", "outputs_unpacked", "stacked_frames", "zeros_as_pad", "reduce_before_view", "matmul_before_view", "frames_resized_alone", "label_layouts", "mark_length_values", "classify_nodes", "fold_crops", "check_framewise",
           "check_causal",
           "annotate_timing",
           "select_kernels", "mark_batchnorm_folds", "build_step_graph", "read_rows", "newest_rows"]
