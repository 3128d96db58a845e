"""MkDocs hook: keep the example command lines of the CLI reference as lines.

click prints a help-text paragraph that starts with a ``\\b`` line without rewrapping it; the
commands use that for their example lines. mkdocs-click drops the ``\\b`` and passes the help
text to Markdown, where such lines would run together into one sentence. This preprocessor
runs right after mkdocs-click's and turns every run of lines that start with one of the
project's commands (outside fenced code) into a ``bash`` code block.
"""

from __future__ import annotations

from markdown import Extension
from markdown.preprocessors import Preprocessor

COMMANDS = ("featurestore ", "recommend ", "eval ", "python ", "torchrun ")
FENCE = "```"


class ClickExamples(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        block: list[str] = []
        in_fence = False
        for line in lines:
            if line.lstrip().startswith(FENCE):
                in_fence = not in_fence
            if not in_fence and line.startswith(COMMANDS):
                block.append(line)
                continue
            if block:
                out += ["", FENCE + "bash", *block, FENCE, ""]
                block = []
            out.append(line)
        if block:
            out += ["", FENCE + "bash", *block, FENCE, ""]
        return out


class ClickExamplesExtension(Extension):
    def extendMarkdown(self, md) -> None:  # noqa: N802 (Markdown's API)
        md.preprocessors.register(ClickExamples(md), "click_examples", 140)  # mkdocs-click is 141


def on_config(config):
    config.markdown_extensions.append(ClickExamplesExtension())
    return config
