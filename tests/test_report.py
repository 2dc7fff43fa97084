"""Provenance lines (cam2mask_lib.report)."""
import torch

from cam2mask_lib import report


def test_the_machine_line_names_the_cpus_vector_instructions_and_threads():
    """Tables made on AVX2 and AVX-512 CPUs differ slightly for the same seed (torch's kernels
    sum in another order), so the provenance line says which kind made them."""
    line = report.machine("cpu")
    assert line.startswith("CPU ") and f"({torch.backends.cpu.get_cpu_capability()})" in line
    assert line.endswith(f"{torch.get_num_threads()} torch threads")
