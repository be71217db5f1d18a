"""Whether to believe a heatmap: sanity checks, faithfulness, agreement, shortcut flags."""
from .agreement import Agreement, agreement
from .faithfulness import Curves, deletion_insertion, energy_pointing_game, pointing_game
from .randomization import RandomizationReport, layer_groups, randomization_test
from .shortcuts import fixed_hotspots, flag_outside, outside_share
from .similarity import spearman, ssim

__all__ = ["Agreement", "Curves", "RandomizationReport", "agreement", "deletion_insertion", "energy_pointing_game",
           "fixed_hotspots", "flag_outside", "layer_groups", "outside_share", "pointing_game",
           "randomization_test", "spearman", "ssim"]
