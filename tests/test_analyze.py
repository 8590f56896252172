"""`engram-analyze` on the micro Engram run and its baseline."""

import copy
import json

import numpy as np
import pytest

from test_analysis import reference_cka

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs():
    import micro_runs

    return micro_runs.trained_run(engram=True), micro_runs.trained_run(engram=False)


def test_analyze_writes_logit_lens_cka_and_gates(runs, tmp_path, capsys):
    from train.analyze import analyze, main
    from train.evaluate import Trained

    engram, baseline = runs
    assert main(["--checkpoint", str(engram), "--baseline", str(baseline), "--max-tokens", "256",
                 "--out", str(tmp_path)]) == 0
    assert "aligned to baseline layer" in capsys.readouterr().out
    for name in ("logit_lens.png", "cka.png", "gates.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "analysis.json").read_text())
    for key in ("engram", "baseline"):
        kl, top1 = result[key]["kl"], result[key]["top1"]
        assert len(kl) == 2 and kl[-1] == pytest.approx(0.0, abs=1e-4) and top1[-1] == 1.0
        assert kl[0] > kl[-1]
        assert result[key]["tokens"] == 256
    cka = np.asarray(result["cka"])
    assert cka.shape == (2, 2) and ((cka > 0) & (cka <= 1 + 1e-6)).all()
    assert len(result["alignment"]) == 2 and all(0 <= a <= 1 for a in result["alignment"])
    # The numbers are CKA of the layers' streams, computed here another way.
    again, streams = analyze(Trained(engram), Trained(baseline), max_tokens=256)
    np.testing.assert_allclose(again["cka"], result["cka"], atol=1e-6)
    for i in range(2):
        for j in range(2):
            expected = reference_cka(streams["engram"][i].astype(np.float64), streams["baseline"][j].astype(np.float64))
            assert cka[i, j] == pytest.approx(expected, abs=1e-4)


def test_a_baseline_of_another_depth_or_tokenizer_is_refused(runs):
    from tokenizers import Tokenizer

    from train.analyze import check_comparable
    from train.evaluate import Trained

    engram, baseline = map(Trained, runs)
    check_comparable(engram, baseline)
    deeper = copy.copy(baseline)
    deeper.config = baseline.config.replace(model=baseline.config.model.replace(num_layers=3))
    with pytest.raises(ValueError, match="the baseline has 3 layers and the Engram model 2"):
        check_comparable(engram, deeper)
    other = copy.copy(baseline)
    other.tokenizer = Tokenizer.from_str(baseline.tokenizer.to_str())
    other.tokenizer.add_tokens(["<another token>"])
    assert other.tokenizer.to_str() != baseline.tokenizer.to_str()
    with pytest.raises(ValueError, match="tokenizer differs"):
        check_comparable(engram, other)


def test_a_missing_baseline_is_one_line(runs, tmp_path, capsys):
    from train.analyze import main

    assert main(["--checkpoint", str(runs[0]), "--baseline", str(tmp_path / "nothing")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"engram-analyze: error: no checkpoint at {tmp_path / 'nothing'}"]
