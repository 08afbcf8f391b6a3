#!/usr/bin/env bash
# Checks the READMEs against the code:
# - the layout table of README.md names every public module `cargo doc` shows, and
#   no other module, and every private file it names exists;
# - every Rust snippet of README.md and examples/README.md compiles exactly as
#   shown (`cargo check`: types and borrows, without codegen and link), each as a
#   binary of a new project that depends on this crate by path, the way a user who
#   copies it would (with the dependencies its first comment names).
# Fails, naming the row or the snippet's file and line.
#
#   scripts/readme.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
(cd "$repo" && cargo doc --no-deps --all-features --quiet)
python3 - "$repo" <<'PY'
import pathlib, re, sys
repo = pathlib.Path(sys.argv[1])
doc = repo / "target/doc/comapi_webhook"
shown = {"::".join(p.parent.relative_to(doc).parts) for p in doc.rglob("index.html")} - {""}
text = (repo / "README.md").read_text()
table = text[text.index("| public module, or private file | owns |"):]
table = table[: table.index("\n\n")]
named = set()
for row in table.splitlines()[2:]:
    cell = row.split("|")[1].strip().strip("`")
    if cell.endswith(".rs"):
        if not (repo / cell).is_file():
            sys.exit(f"README.md layout: {cell} is not a file")
    else:
        named.add(cell)
if named != shown:
    sys.exit(f"README.md layout and cargo doc disagree: only in the README {sorted(named - shown)}, "
             f"only in cargo doc {sorted(shown - named)}")
print(f"layout: the {len(shown)} public modules of cargo doc, as the README shows them")
PY
project=$(mktemp -d "${TMPDIR:-/tmp}/comapi-snippets.XXXXXX")
trap 'rm -rf "$project"' EXIT
mkdir -p "$project/src/bin"
cat > "$project/Cargo.toml" <<TOML
[package]
name = "snippets"
version = "0.0.0"
edition = "2024"
publish = false

[dependencies]
comapi-webhook = { path = "$repo", features = ["receiver", "redis", "axum", "actix"] }
axum = { version = "0.8", default-features = false, features = ["http1", "tokio"] }
actix-web = { version = "4.9", default-features = false, features = ["macros"] }
tokio = { version = "1.40", features = ["macros", "rt-multi-thread", "net", "signal"] }
TOML
echo 'fn main() {}' > "$project/src/main.rs"
# The versions this repository is tested with.
cp "$repo/Cargo.lock" "$project/Cargo.lock"
python3 - "$repo" "$project/src/bin" <<'PY'
import pathlib, re, sys
repo, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
count = 0
for doc in ["README.md", "examples/README.md"]:
    lines = (repo / doc).read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```rust(,no_run)?\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start = i + 1
        j = start
        while lines[j] != "```":
            j += 1
        body = lines[start:j]
        hidden = [l for l in body if l.startswith("# ") or l == "#"]
        if hidden:
            sys.exit(f"{doc}:{start}: a hidden rustdoc line shows on GitHub: {hidden[0]!r}")
        name = re.sub(r"\W", "_", doc.lower()).replace("_md", "") + f"_line_{start}"
        (out / f"{name}.rs").write_text("\n".join(body) + "\n")
        count += 1
        i = j + 1
print(f"{count} snippets")
PY
cd "$project"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}" cargo check --bins --quiet
echo "every snippet compiles as shown"
