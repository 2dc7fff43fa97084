"""Provenance lines (cam2mask_lib.report)."""
import torch

from cam2mask_lib import report


def test_the_machine_line_names_the_cpus_vector_instructions_and_threads():
    """Tables made on AVX2 and AVX-512 CPUs differ slightly for the same seed (torch's kernels
    sum in another order), so the provenance line says which kind made them."""
    line = report.machine("cpu")
    assert line.startswith("CPU ") and f"({torch.backends.cpu.get_cpu_capability()})" in line
    assert line.endswith(f"{torch.get_num_threads()} torch threads")


def test_the_report_states_the_provenance_once_and_appends_missing_tables_as_missing(tmp_path):
    import pandas as pd
    prov = report.Provenance("cpu", "SYNTHETIC", 0)
    for name in ("table1_classification_auc", "table2_cam_dice"):
        report.save_table(pd.DataFrame({"a": [0.123456789]}), tmp_path, name, name, prov)
    out = report.build_report(tmp_path, tmp_path / "R.md", "title", prov.line(),
                              opening="| claim |\n| --- |\n| x |",
                              appendix=[("Spread", tmp_path / "none.md", "what it is")])
    text = out.read_text()
    assert text.count(prov.line()) == 1                       # at the top only
    assert "## Which of the paper's claims hold" in text and "| claim |" in text
    assert "0.1235" in text and "0.123456" not in text         # 4 significant digits
    assert "## Spread" in text and "_Not measured yet: " in text
    assert "Table `table3_segmentation` was not produced" in text


def test_the_readmes_real_data_rows_are_read_from_the_benchmarks_tables(tmp_path):
    import json

    import pandas as pd
    rows = list(report.REAL_DATA_ROWS)
    df = pd.DataFrame({"masks": [r + " (suffix)" for r in rows] + ["another row"],
                       "Dice (defective images)": [0.5, 0.6, 0.7, 0.8, 0.9, 0.1],
                       "gap closed": [0.1, 0.25, 0.5, 0.75, 1, 0.1],
                       "Dice (non-empty masks)": [0.1, 0.2, 0.4, 0.5, 0.6, 0.1],
                       "non-empty, share of supervised": [0.1, 0.3, 0.6, 0.8, 1, 0.1],
                       report.DEFECT_FREE: [0.6, 0.5, 0.25, 0.03, 0.02, 0.1]})
    (tmp_path / "a").mkdir()
    df.to_csv(tmp_path / "a" / "real_quality.csv", index=False)
    (tmp_path / "a" / "real_quality.json").write_text(json.dumps({"auc": [0.9876]}))
    (tmp_path / "b").mkdir()
    df.drop(columns=report.DEFECT_FREE).to_csv(tmp_path / "b" / "real_quality.csv", index=False)
    block = report.real_data_block({"set a": tmp_path / "a", "set b": tmp_path / "b",
                                    "set c": tmp_path / "c"})
    lines = block.splitlines()
    assert len([x for x in lines if x.startswith("| set a")]) == 5 and "another row" not in block
    assert "| set a | label-only refinement of those maps | 0.700 | 0.400 | 50% | 60% | 25% " \
           "| 0.988 |" in block
    assert "| set b | " in block and "no such images" in block and "| n/a |" in block
    assert "| set a | last layer x stride 8, cut as the paper does | 0.600 |" in block
    assert "set c: not measured yet" in block


def test_the_cpu_line_names_family_and_model_where_the_kernel_says_them():
    text = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    if "cpu family" in text and "model name" in text:
        assert ", family " in report.cpu_model()
