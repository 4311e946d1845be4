"""The emulator command's options, its variables and how each shell's lines read back."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest

from joblib_azurebatch import cli
from joblib_azurebatch.config import BatchConfig, default_image
from joblib_azurebatch.emulator import command

ARGVS = [
    [],
    ["--nodes", "3", "--slots-per-node", "4"],
    [
        "--slots", "1",
        "--spot-nodes", "2",
        "--nodes", "0",
        "--shell", "cmd",
        "--bare-nodes",
        "--allocation-delay", "1.5",
        "--max-processes", "3",
    ],
]  # fmt: skip

#: What each shell must carry through unchanged (cmd cannot quote `"` or `%`: below).
AWKWARD = "it's a \u2018test\u2019: $HOME `id` $(id) ; & | < > ^ ! * ? [a] ~ \\ =x= \u00e9  end "


def _cli_args(argv: list[str]) -> dict[str, Any]:
    args = vars(cli.build_parser().parse_args(["emulator", *argv]))
    del args["func"], args["command"]
    return args


def _help_options(parse: Any, capsys: pytest.CaptureFixture[str]) -> set[str]:
    with pytest.raises(SystemExit):
        parse()
    return set(re.findall(r"--[a-z][a-z-]+", capsys.readouterr().out))


def test_both_entry_points_take_the_same_options(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ARGVS:
        assert _cli_args(argv) == vars(command.build_parser().parse_args(argv))
    defaults = _cli_args([])
    assert (defaults["nodes"], defaults["spot_nodes"], defaults["slots"]) == (2, 0, 2)
    assert defaults["shell"] is None
    assert _cli_args(["--slots-per-node", "5"])["slots"] == 5
    in_cli = _help_options(lambda: cli.build_parser().parse_args(["emulator", "--help"]), capsys)
    in_module = _help_options(lambda: command.build_parser().parse_args(["--help"]), capsys)
    assert in_cli == in_module
    assert {"--nodes", "--slots", "--slots-per-node", "--shell", "--bare-nodes"} <= in_module


@pytest.mark.parametrize("argv", [["--slots", "0"], ["--nodes", "-1"], ["--shell", "fish"]])
def test_both_entry_points_refuse_the_same_input(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as cli_exit:
        cli.build_parser().parse_args(["emulator", *argv])
    with pytest.raises(SystemExit) as module_exit:
        command.build_parser().parse_args(argv)
    assert cli_exit.value.code == module_exit.value.code == 2


def test_bash_lines_read_back_in_bash() -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    variables = {"PLAIN": "localbatch", "AWKWARD": AWKWARD, "QUOTES": 'a"b\'c"d', "EMPTY": ""}
    lines = command.format_variables(variables, "bash")
    assert lines[0] == "export PLAIN=localbatch"
    script = "\n".join([*lines, *(f'printf "%s\\0" "${name}"' for name in variables)])
    done = subprocess.run(
        [bash, "--norc", "--noprofile", "-c", script],
        capture_output=True,
        check=True,
        env={"HOME": "/nowhere"},
    )
    assert done.stdout.decode().split("\0")[:-1] == list(variables.values())


def _powershell(line: str) -> tuple[str, str]:
    """PowerShell's reading of `$env:NAME = '...'`: in a single-quoted string only the quote
    characters (' and the typographic ones) are special, and two of them stand for one."""
    match = re.fullmatch(
        r"\$env:(\w+) = '((?:[^'\u2018\u2019\u201a\u201b]|(['\u2018\u2019\u201a\u201b])\3)*)'", line
    )
    assert match, line
    return match.group(1), re.sub(r"(['\u2018\u2019\u201a\u201b])\1", r"\1", match.group(2))


def test_powershell_lines_read_back() -> None:
    variables = {"A": "localbatch", "B": AWKWARD, "C": "''", "D": 'a"b%c%'}
    lines = command.format_variables(variables, "powershell")
    assert lines[0] == "$env:A = 'localbatch'"
    assert dict(_powershell(line) for line in lines) == variables


def _cmd(line: str) -> tuple[str, str]:
    """cmd's reading of `set "NAME=value"`: everything between the first `=` and the last
    quote, with no character special inside the quotes but `%` and `"`."""
    match = re.fullmatch(r'set "(\w+)=([^"%]*)"', line)
    assert match, line
    return match.group(1), match.group(2)


def test_cmd_lines_read_back() -> None:
    variables = {"A": "localbatch", "B": AWKWARD, "C": "x=y;z=w"}
    lines = command.format_variables(variables, "cmd")
    assert lines[0] == 'set "A=localbatch"'
    assert dict(_cmd(line) for line in lines) == variables
    for value in ('say "hi"', "100%", "two\nlines"):
        with pytest.raises(ValueError, match="cmd cannot set"):
            command.format_variables({"X": value}, "cmd")


def test_the_shell_is_guessed_from_the_parent_processes_on_windows() -> None:
    assert command.guess_shell({}, windows=False) == "bash"
    guess = command.guess_shell
    assert guess({}, windows=True, parents=["joblib-azurebatch.exe", "pwsh.exe"]) == "powershell"
    assert guess({}, windows=True, parents=["python.exe", "powershell.exe", "cmd.exe"]) == (
        "powershell"
    )
    assert guess({}, windows=True, parents=["python.exe", "cmd.exe", "pwsh.exe"]) == "cmd"
    assert guess({}, windows=True, parents=["python.exe", "bash.exe"]) == "bash"
    # No shell among the parents (a launcher in between): PSModulePath says which.
    system = (
        r"C:\Program Files\WindowsPowerShell\Modules;"
        r"C:\WINDOWS\system32\WindowsPowerShell\v1.0\Modules"
    )
    user = r"C:\Users\ada\Documents\WindowsPowerShell\Modules;" + system
    env = {"USERPROFILE": r"C:\Users\ada", "COMSPEC": r"C:\WINDOWS\system32\cmd.exe"}
    assert guess({**env, "PSModulePath": user}, windows=True, parents=[]) == "powershell"
    assert guess({**env, "PSModulePath": system}, windows=True, parents=[]) == "cmd"


class _Account:
    """What account_variables reads of a LocalBatch: its environment and its config."""

    def __init__(self, *, bare: bool) -> None:
        self.bare = bare

    def environment(self) -> dict[str, str]:
        return {
            "BATCH_ACCOUNT_NAME": "localbatch",
            "BATCH_ACCOUNT_KEY": "a2V5",
            "BATCH_ACCOUNT_URL": "http://127.0.0.1:1",
            "STORAGE_ACCOUNT_NAME": "devstoreaccount1",
            "STORAGE_ACCOUNT_KEY": "a2V5",
        }

    def config(self) -> BatchConfig:
        return BatchConfig(
            batch_url="http://127.0.0.1:1",
            batch_account="localbatch",
            batch_key="a2V5",
            storage_account="devstoreaccount1",
            storage_key="a2V5",
            storage_url="http://127.0.0.1:2/devstoreaccount1",
            dedicated_nodes=1,
            spot_nodes=0,
            task_slots_per_node=1,
            poll_interval=0.2,
            image=None if self.bare else default_image(),
        )


@pytest.mark.parametrize("bare", [False, True])
def test_variables_give_from_env_the_config_of_the_account(bare: bool) -> None:
    account = _Account(bare=bare)
    variables = command.account_variables(account)  # type: ignore[arg-type]
    # The pool shape is printed even where it is BatchConfig's default.
    assert variables["JOBLIB_AZUREBATCH_DEDICATED_NODES"] == "1"
    assert variables["JOBLIB_AZUREBATCH_SPOT_NODES"] == "0"
    assert variables["JOBLIB_AZUREBATCH_TASK_SLOTS_PER_NODE"] == "1"
    assert ("JOBLIB_AZUREBATCH_IMAGE" in variables) is not bare
    assert BatchConfig.from_env(environ=variables) == account.config()
