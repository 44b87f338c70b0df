from kvrag.cli.common import StepProgress


def test_step_progress_logs_one_line_per_update_off_a_terminal(capsys):
    with StepProgress("step", 3, "loss") as progress:
        progress.update(1, "0.512")
        progress.update(2, "0.401", description="snapkv[chunk=16]:0.5")
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["step 1/3 loss 0.512", "snapkv[chunk=16]:0.5 2/3 loss 0.401"]
    assert progress.done == 2


def test_errors_print_brackets_as_written(capsys):
    import pytest
    import typer

    from kvrag.cli.common import fail

    with pytest.raises(typer.Exit):
        fail("snapkv[window=big]:0.5 is refused")
    assert "error: snapkv[window=big]:0.5 is refused" in capsys.readouterr().err


def test_device_and_dtype_help_name_every_choice_the_resolver_takes():
    from kvrag.cli.common import DeviceOption, DtypeOption
    from kvrag.engines.device import DEVICES, DTYPES

    assert DEVICES in DeviceOption.__metadata__[0].help
    assert all(name in DtypeOption.__metadata__[0].help for name in ("auto", *DTYPES))
