#!/usr/bin/env python3
"""Fails when a public symbol of the libraries has no doc comment.

docc has no "undocumented symbol" warning, so .ci/build-docs runs this over the symbol graphs the compiler emitted
(the same files docc reads). A symbol needs its own comment unless DocC shows a protocol's for it: a witness of a
requirement (the standard library's, listed below by name, or one of this package's own protocols, read from the
graph), a default implementation of one, or a member the compiler synthesized (no source location).

usage: check-doc-coverage.py GRAPH_DIR MODULE...
"""
import json
import os
import sys

# Members that implement a standard-library or Dispatch protocol requirement, whose documentation DocC inherits.
WITNESS_NAMES = {
    "description", "debugDescription", "hashValue", "hash(into:)", "rawValue", "init(rawValue:)",
    "makeAsyncIterator()", "next()", "next(isolation:)", "Element", "Failure", "AsyncIterator", "Iterator",
    "Instant", "Duration", "now", "minimumResolution", "sleep(until:tolerance:)",
    "unownedExecutor", "enqueue(_:)", "asUnownedSerialExecutor()", "asUnownedTaskExecutor()", "checkIsolated()",
    "isIsolatingCurrentContext()", "isSameExclusiveExecutionContext(other:)", "isMainExecutor",
    "insert(_:)", "encode(to:)", "init(from:)", "errorDescription", "==(_:_:)", "<(_:_:)",
}


def undocumented(graph_dir, module):
    with open(os.path.join(graph_dir, f"{module}.symbols.json")) as file:
        graph = json.load(file)
    symbols = {symbol["identifier"]["precise"]: symbol for symbol in graph["symbols"]}
    # Requirements of this module's protocols, by name, and which of its types conform to which protocol.
    requirement_names = {}
    defaults = set()
    conformances = {}
    parents = {}
    for relation in graph["relationships"]:
        kind, source, target = relation["kind"], relation["source"], relation["target"]
        if kind == "requirementOf" and source in symbols:
            requirement_names.setdefault(target, set()).add(symbols[source]["pathComponents"][-1])
        elif kind == "defaultImplementationOf":
            defaults.add(source)
        elif kind == "conformsTo":
            conformances.setdefault(source, set()).add(target)
        elif kind == "memberOf":
            parents[source] = target
    missing = []
    for precise, symbol in symbols.items():
        if symbol.get("accessLevel") not in ("public", "open") or "docComment" in symbol:
            continue
        name = symbol["pathComponents"][-1]
        if name in WITNESS_NAMES or precise in defaults or "location" not in symbol:
            continue
        parent = parents.get(precise)
        if parent and any(name in requirement_names.get(protocol, ())
                          for protocol in conformances.get(parent, ())):
            continue
        location = symbol.get("location", {})
        path = location.get("uri", "").replace("file://", "")
        line = location.get("position", {}).get("line", -1) + 1
        missing.append(f"{os.path.relpath(path) if path else '?'}:{line}: {symbol['kind']['displayName'].lower()} "
                       f"{'.'.join(symbol['pathComponents'])} has no doc comment")
    return missing


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    graph_dir, modules = sys.argv[1], sys.argv[2:]
    missing = [line for module in modules for line in undocumented(graph_dir, module)]
    for line in sorted(missing):
        print(line, file=sys.stderr)
    if missing:
        print(f"{len(missing)} public symbols have no doc comment", file=sys.stderr)
        return 1
    print(f"every public symbol of {', '.join(modules)} has a doc comment")
    return 0


if __name__ == "__main__":
    sys.exit(main())
