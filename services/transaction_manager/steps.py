"""Route steps: what can happen to an arrived file, validated when a route is saved.

A route is an ordered list of steps; each has a retry policy. The current file moves along:
`move` and `rename` change it, `copy` and `push` leave it where it is, `delete` removes it.
"""

from __future__ import annotations

import re
import string
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter

TEMPLATE_FIELDS = {"name", "stem", "ext", "date", "time", "counter", "event_id", "cycle_id"}


class RetryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(default=1, ge=1, le=20)
    backoff_seconds: float = Field(default=1.0, ge=0, le=60)


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")

    retry: RetryPolicy = Field(default_factory=RetryPolicy)


def _check_folder(value: str) -> str:
    if "\x00" in value or any(part == ".." for part in re.split(r"[\\/]", value)):
        raise ValueError("folder must stay inside the data directory (no '..')")
    return value


MAX_TEMPLATE_WIDTH = 64
MAX_NAME_LENGTH = 255
# A standard format spec without nested fields: fill/align, sign, #, 0, width, grouping,
# precision, type.
_FORMAT_SPEC = re.compile(
    r"^(?:.?[<>=^])?[+\- ]?#?0?(?P<width>\d*)[,_]?(?:\.(?P<prec>\d+))?[a-zA-Z%]?$"
)
_SAMPLE = {"name": "orders.csv", "stem": "orders", "ext": "csv",
           "date": datetime(2024, 1, 31), "time": "235959", "counter": 12345,
           "event_id": "e" * 32, "cycle_id": "c" * 32}  # fmt: skip


class TemplateError(ValueError):
    pass


class NameFormatter(string.Formatter):
    """str.format for hostile templates: only the known fields by plain name (no attribute
    or index access, no conversions, no nested fields in a spec), widths and precisions
    capped, and the result's length capped."""

    def parse(self, format_string: str) -> Any:
        for literal, field, spec, conversion in super().parse(format_string):
            if field is not None:
                if field not in TEMPLATE_FIELDS:
                    if field.split(".")[0].split("[")[0] in TEMPLATE_FIELDS:
                        raise TemplateError(f"no attribute or index access in {{{field}}}")
                    raise TemplateError(
                        f"unknown template field(s) [{field!r}]; use {sorted(TEMPLATE_FIELDS)}"
                    )
                if conversion:
                    raise TemplateError(f"no conversions (!{conversion}) in {{{field}}}")
                if spec and ("{" in spec or "}" in spec):
                    raise TemplateError(f"no nested fields in {{{field}:{spec}}}")
                if spec and field == "date":
                    if len(spec) > 32 or re.search(r"\d{3,}", spec):
                        raise TemplateError(f"date format {spec!r} is too long")
                elif spec:
                    match = _FORMAT_SPEC.match(spec)
                    if match is None:
                        raise TemplateError(f"bad format {spec!r} in {{{field}}}")
                    for part in ("width", "prec"):
                        if match[part] and int(match[part]) > MAX_TEMPLATE_WIDTH:
                            raise TemplateError(
                                f"width {match[part]} in {{{field}:{spec}}} is over "
                                f"{MAX_TEMPLATE_WIDTH}"
                            )
            yield literal, field, spec, conversion

    def render(self, template: str, **values: Any) -> str:
        name = self.vformat(template, (), values)
        if len(name) > MAX_NAME_LENGTH:
            raise TemplateError(f"template {template!r} gives a name over {MAX_NAME_LENGTH} chars")
        return name


FORMATTER = NameFormatter()


def _check_template(value: str) -> str:
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"a name template has at most {MAX_NAME_LENGTH} characters")
    if "/" in value or "\\" in value:
        raise ValueError("a name template may not contain a path separator")
    try:
        FORMATTER.render(value, **_SAMPLE)
    except TemplateError:
        raise
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(f"bad template: {exc}") from exc
    return value


# A folder relative to FERRYLINK_DATA_DIR, and a file-name template.
Folder = Annotated[str, Field(min_length=1), AfterValidator(_check_folder)]
NameTemplate = Annotated[str, Field(min_length=1), AfterValidator(_check_template)]


# What a step that places a file does when its target name is taken: fail the transfer,
# take the next free versioned name (`report_1.csv`, `report_2.csv`, ...), or replace it.
# Whatever happens shows in the transfer log; nothing is overwritten unless the route says so.
IfExists = Literal["fail", "version", "overwrite"]
IF_EXISTS_DESCRIPTION = "When the target name is taken: fail, version the name, or overwrite."


class CopyStep(_Step):
    """Copy the file to a folder of the data directory (the file itself stays)."""

    kind: Literal["copy"]
    folder: Folder
    if_exists: IfExists = Field(default="fail", description=IF_EXISTS_DESCRIPTION)


class MoveStep(_Step):
    """Move the file to a folder of the data directory; later steps see it there."""

    kind: Literal["move"]
    folder: Folder
    if_exists: IfExists = Field(default="fail", description=IF_EXISTS_DESCRIPTION)


class RenameStep(_Step):
    """Rename in place by a template: {name} {stem} {ext} {date:%Y%m%d} {time} {counter}
    {event_id} {cycle_id}."""

    kind: Literal["rename"]
    template: NameTemplate = Field(examples=["{date:%Y%m%d}_{counter}_{name}"])
    if_exists: IfExists = Field(default="fail", description=IF_EXISTS_DESCRIPTION)


class ChecksumStep(_Step):
    """Compute a checksum; with `expected` ("event" = the checksum the event carried, or a
    hex digest) a mismatch fails the transfer."""

    kind: Literal["checksum"]
    algorithm: Literal["sha256", "sha1", "md5"] = "sha256"
    expected: str | None = None


class PushStep(_Step):
    """Send the file to a partner (SFTP or HTTP)."""

    kind: Literal["push"]
    partner: str = Field(min_length=1)
    remote_name: NameTemplate = Field(default="{name}", description="Name on the partner.")
    retry: RetryPolicy = Field(default_factory=lambda: RetryPolicy(attempts=3))


class DeleteStep(_Step):
    """Delete the file (put it last: after every step before it succeeded)."""

    kind: Literal["delete"]


Step = Annotated[
    CopyStep | MoveStep | RenameStep | ChecksumStep | PushStep | DeleteStep,
    Field(discriminator="kind"),
]
STEPS = TypeAdapter(list[Step])


def render(
    template: str, file_name: str, when: datetime, counter: int, event_id: str, cycle_id: str
) -> str:
    """Fill a name template; the result is a plain file name."""
    stem, dot, ext = file_name.rpartition(".")
    if not dot:
        stem, ext = file_name, ""
    name = FORMATTER.render(
        template, name=file_name, stem=stem, ext=ext, date=when, time=when.strftime("%H%M%S"),
        counter=counter, event_id=event_id, cycle_id=cycle_id,
    )  # fmt: skip
    if not name or name in {".", ".."} or "/" in name or "\x00" in name:
        raise ValueError(f"template {template!r} gives an unusable file name {name!r}")
    return name


def versioned(file_name: str, version: int) -> str:
    """`report.csv` -> `report_1.csv` (version 1), `README` -> `README_1`."""
    stem, dot, ext = file_name.rpartition(".")
    if not dot or not stem:
        return f"{file_name}_{version}"
    return f"{stem}_{version}.{ext}"
