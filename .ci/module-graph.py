#!/usr/bin/env python3
"""Check that perishable-core's top-level modules form a one-way graph.

Scans crates/perishable-core/src/**/*.rs for `crate::<module>` references (`use` paths,
`use crate::{a, b::c}` groups and inline `crate::x::` paths), skipping comments, doc comments
and `#[cfg(test)]` items. The module of a file is its first path component under src/
(`src/a.rs` and `src/a/**` are module `a`); `lib.rs` is the root and is left out.

Exits 1 and prints every cycle (strongly connected component of more than one module) if there
is one; exits 0 with a one-line summary otherwise. `--graph` also prints the edges.
`MODULE_GRAPH_SRC=dir` scans another source tree (an older revision, say).
"""

import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SRC = os.environ.get("MODULE_GRAPH_SRC") or os.path.join(ROOT, "crates", "perishable-core", "src")


def strip_comments_and_strings(text):
    """Blank out comments (line, block, doc) and string/char literals, keeping newlines."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            end = '"' + m.group(1)
            j = text.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j += 1
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c == "'":
            # A char literal ('a', '\n', '\u{..}') or a lifetime ('a): only blank the literal.
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:])
            if m:
                i += m.end()
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def strip_cfg_test(text):
    """Remove items annotated `#[cfg(test)]` (a `mod tests { ... }`, a fn, a use...)."""
    out, i = [], 0
    pattern = re.compile(r"#\[cfg\(test\)\]")
    while True:
        m = pattern.search(text, i)
        if not m:
            out.append(text[i:])
            break
        out.append(text[i:m.start()])
        j = m.end()
        # The item ends at its first `;` at depth 0, or at the `}` closing its first `{`.
        depth = 0
        while j < len(text):
            ch = text[j]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    j += 1
                    break
            elif ch == ";" and depth == 0:
                j += 1
                break
            j += 1
        out.append("\n" * text.count("\n", m.start(), j))
        i = j
    return "".join(out)


def braced(text, start):
    """The text inside the braces opening at text[start] == '{'."""
    depth, j = 0, start
    while j < len(text):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:j]
        j += 1
    return text[start + 1:]


def split_top(group):
    parts, depth, cur = [], 0, []
    for ch in group:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def references(code):
    """Top-level module names referenced as `crate::<name>` (directly or in a group)."""
    refs = set()
    for m in re.finditer(r"\bcrate\s*::\s*(\{|" + IDENT + ")", code):
        if m.group(1) == "{":
            for part in split_top(braced(code, m.start(1))):
                name = re.match(IDENT, part)
                if name and name.group(0) not in ("self",):
                    refs.add(name.group(0))
        else:
            refs.add(m.group(1))
    return refs


def module_of(path):
    rel = os.path.relpath(path, SRC).replace(os.sep, "/")
    first = rel.split("/")[0]
    if first == "lib.rs":
        return None
    return first[:-3] if first.endswith(".rs") else first


def root_reexports():
    """Names `lib.rs` re-exports (`pub use config::{Config, ...}`), mapped to their module, so
    that `crate::Config` counts as a use of `config`."""
    with open(os.path.join(SRC, "lib.rs"), encoding="utf-8") as fh:
        code = strip_cfg_test(strip_comments_and_strings(fh.read()))
    names = {}
    for m in re.finditer(r"\bpub(?:\([^)]*\))?\s+use\s+(" + IDENT + r")\s*::\s*([^;]*);", code):
        module, rest = m.group(1), m.group(2).strip()
        items = split_top(rest[1:-1]) if rest.startswith("{") else [rest]
        for item in items:
            alias = re.search(r"\bas\s+(" + IDENT + r")\s*$", item)
            last = alias.group(1) if alias else re.split(r"\s*::\s*", item)[-1]
            if re.fullmatch(IDENT, last):
                names[last] = module
    return names


def build_graph():
    modules, edges = set(), {}
    reexports = root_reexports()
    for dirpath, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(dirpath, f)
            mod = module_of(path)
            if mod is None:
                continue
            modules.add(mod)
            with open(path, encoding="utf-8") as fh:
                code = strip_cfg_test(strip_comments_and_strings(fh.read()))
            refs = {reexports.get(r, r) for r in references(code)}
            edges.setdefault(mod, set()).update(refs)
    # Keep edges to real modules only (not to items re-exported at the root).
    for mod in edges:
        edges[mod] = {t for t in edges[mod] if t in modules and t != mod}
    return modules, edges


def sccs(nodes, edges):
    """Tarjan's strongly connected components."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def main():
    modules, edges = build_graph()
    if "--graph" in sys.argv[1:]:
        for mod in sorted(modules):
            print(f"{mod} -> {', '.join(sorted(edges.get(mod, ()))) or '(leaf)'}")
    cycles = [c for c in sccs(modules, edges) if len(c) > 1]
    if cycles:
        print(f"{len(modules)} modules, {len(cycles)} cycle(s):")
        for comp in cycles:
            inside = set(comp)
            print(f"  cycle of {len(comp)}: {', '.join(comp)}")
            for mod in comp:
                targets = sorted(edges[mod] & inside)
                print(f"    {mod} -> {', '.join(targets)}")
        return 1
    print(f"{len(modules)} modules, no cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
