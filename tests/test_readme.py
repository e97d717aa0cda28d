"""The README's Quick start and CI stay in step: two commands, the second is what CI runs."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
  readme = (REPO / "README.md").read_text()
  section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S)]


def test_quick_start_has_exactly_two_commands():
  commands = _quick_start_commands()
  assert len(commands) == 2 and all("\n" not in c for c in commands), commands


def test_ci_runs_the_second_command():
  ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
  assert ci_lines[-1] == _quick_start_commands()[1]


def test_first_command_names_files_that_exist():
  first = _quick_start_commands()[0]
  config = re.search(r"(configs/\w+\.py)", first).group(1)
  module = re.search(r"-m (launch\.\w+)", first).group(1)
  assert (REPO / config).exists()
  assert (REPO / (module.replace(".", "/") + ".py")).exists()
