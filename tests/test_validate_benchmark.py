"""`python -m consisid_lab.validate_benchmark`: every figure, the controls and the targets, as one JSON object."""

from __future__ import annotations

import json

import pytest

CONTROL_NAMES = {
    "real",
    "other_identity",
    "noise",
    "colour_noise",
    "grey",
    "blurred",
    "high_passed",
    "pasted_reference",
}
FLAT_KEYS = {
    "noise_facesim",
    "noise_facesim_low",
    "noise_facesim_high",
    "noise_face_rate",
    "grey_facesim",
    "real_face_rate",
    "blurred_over_real_facesim_high",
    "codec_high_only_auc",
    "codec_low_only_auc",
    "codec_psnr_db",
    "codec_identity_gap",
    "real_identity_gap",
    "codec_gap_over_real",
}


def _run(capsys, *args: str) -> dict:
    from consisid_lab.validate_benchmark import main

    result = main(list(args))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(result, sort_keys=True, default=float))
    return result


def test_validation_prints_controls_and_targets_as_its_last_line(tmp_path, capsys) -> None:
    result = _run(capsys, "--recipe", "tiny", "--pairs", "4", "--cache-dir", str(tmp_path))
    assert set(result["controls"]) == CONTROL_NAMES
    for row in result["controls"].values():
        assert {"facesim", "facesim_low", "facesim_high", "face_rate", "copy_paste"} <= set(row)
        assert {"identity_gap", "identity_gap_low", "identity_gap_high"} <= set(row)
    assert set(result) >= FLAT_KEYS
    # The pasted reference is as close to the reference as a video can be: the copy-paste ratio flags it.
    assert result["controls"]["pasted_reference"]["copy_paste"] > 10 * result["controls"]["real"]["copy_paste"]
    assert result["targets_met"] == all(result["targets"].values())
    # The codec ceiling is the real clips' gap measured on reconstructions, in the same units.
    assert result["real_identity_gap"] == pytest.approx(
        result["controls"]["real"]["facesim"] - result["controls"]["other_identity"]["facesim"]
    )
    assert result["codec_gap_over_real"] == pytest.approx(result["codec_identity_gap"] / result["real_identity_gap"])
    # The background gap: the real clips follow their captions, no control without the clip's background does
    # (colour-matched noise keeps each clip's mean colour, mostly its background's: it is not such a control).
    bg = {name: row["background_gap"] for name, row in result["controls"].items()}
    assert bg["real"] > 0.1 and bg["blurred"] > 0.5 * bg["real"]
    for name in ("other_identity", "noise", "grey", "pasted_reference"):
        assert abs(bg[name]) < 0.5 * bg["real"], (name, bg)


@pytest.mark.slow
def test_default_benchmark_meets_every_target(tmp_path, capsys) -> None:
    """The full stand-in build (about 6 minutes on 2 cores) and every acceptance target of the benchmark."""
    result = _run(capsys, "--pairs", "64", "--cache-dir", str(tmp_path))
    failed = [name for name, ok in result["targets"].items() if not ok]
    assert not failed, failed
    # Blurring removes the high band's identity and keeps the low band's; the controls without a face carry none.
    controls = result["controls"]
    assert controls["blurred"]["identity_gap_high"] < 0.5 * controls["real"]["identity_gap_high"]
    assert controls["blurred"]["identity_gap_low"] > 0.5 * controls["real"]["identity_gap_low"]
    for name in ("noise", "colour_noise", "grey"):
        assert abs(controls[name]["identity_gap"]) <= 0.05, (name, controls[name])
