// swift-tools-version:6.0
//
// swift-userfaultfd: take over your own page faults on Linux, asynchronously.
//
// The library has no package dependencies: only the toolchain (Glibc, Dispatch, Synchronization; Foundation only in
// the HTTP and Firecracker layers) and its own C shim for what Swift cannot import (variadic ioctl/syscall, the _IOWR
// macros, structs newer than the system's linux/userfaultfd.h).
//
// One target per layer, so the compiler holds the layers apart (CONTRIBUTING.md, "Layout"):
//
//     CUserfaultfd → Userfaultfd → UserfaultfdHTTP ─────────┐
//                         └──────→ UserfaultfdFirecracker ──┴→ UffdTool → uffd
//
// (the page server needs no HTTP, so it links no libcurl either; it imports Foundation for its JSON handshake).
//
// A program that imports only `Userfaultfd` links neither Foundation nor FoundationNetworking nor libcurl (.ci/run
// checks it). Internals that another target of the package needs (tools, tests) are `package`, not `public`; the two
// decoders that the fuzz package (Tests/Fuzz, a package of its own) drives are `@_spi(Decoding)`.

import PackageDescription

let strictConcurrency: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
    .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
    name: "swift-userfaultfd",
    products: [
        .library(name: "Userfaultfd", targets: ["Userfaultfd"]),
        .library(name: "UserfaultfdHTTP", targets: ["UserfaultfdHTTP"]),
        .library(name: "UserfaultfdFirecracker", targets: ["UserfaultfdFirecracker"]),
        .executable(name: "uffd", targets: ["uffd"]),
        // The C reference of the benchmarks, shared by `uffd bench` and the Benchmarks/ package.
        .library(name: "CUserfaultfdBaseline", targets: ["CUserfaultfdBaseline"]),
        // What the benchmarks, the tool's scenarios and the tests share (seeded random numbers, RSS readings, pattern
        // files, Dispatch sleeps); shared by `uffd bench`, the Benchmarks/ package and the tests. No Foundation.
        .library(name: "UserfaultfdBenchSupport", targets: ["UserfaultfdBenchSupport"]),
    ],
    targets: [
        // Layer 0: the C shim. Ioctl numbers, kernel structs and non-variadic wrappers.
        .target(name: "CUserfaultfd"),

        // Layers 1–3: core (UserfaultFD, FaultEvent, events), resolution, tracking, the providers that need no
        // network. No Foundation: Glibc, Dispatch and Synchronization only.
        .target(
            name: "Userfaultfd",
            dependencies: ["CUserfaultfd"],
            swiftSettings: strictConcurrency
        ),
        // Layer 4a: remote providers (HTTP ranges, S3). The only target that imports FoundationNetworking.
        .target(
            name: "UserfaultfdHTTP",
            dependencies: ["Userfaultfd"],
            swiftSettings: strictConcurrency
        ),
        // Layer 4b: the Firecracker page server (Unix socket handshake, guest memory regions).
        .target(
            name: "UserfaultfdFirecracker",
            dependencies: ["Userfaultfd"],
            swiftSettings: strictConcurrency
        ),

        // The benchmarks' C reference: userfaultfd(2)'s poll/read/COPY handler (used by `uffd bench` and Benchmarks/).
        .target(name: "CUserfaultfdBaseline"),
        // The helpers of the benchmarks, the tool's scenarios and the tests. Depends on nothing: Glibc and Dispatch.
        .target(name: "UserfaultfdBenchSupport", swiftSettings: strictConcurrency),

        // Layer 5: the command-line tool. Its commands live in a library so tests can drive them.
        .target(
            name: "UffdTool",
            dependencies: ["Userfaultfd", "UserfaultfdHTTP", "UserfaultfdFirecracker", "CUserfaultfdBaseline",
                           "UserfaultfdBenchSupport"],
            swiftSettings: strictConcurrency
        ),
        .executableTarget(
            name: "uffd",
            dependencies: ["UffdTool"],
            swiftSettings: strictConcurrency
        ),

        // Test-only C helpers: forked children and a signal-safe SIGBUS probe (code that must be
        // async-signal-safe, which Swift cannot promise).
        .target(name: "CUserfaultfdTestSupport", path: "Tests/CUserfaultfdTestSupport"),
        // A stand-in for a Firecracker VMM, run as a child process by the page-server tests.
        .executableTarget(
            name: "uffd-fake-vmm",
            dependencies: ["Userfaultfd", "CUserfaultfdTestSupport"],
            path: "Tests/FakeVMM",
            swiftSettings: strictConcurrency
        ),
        // The fork scenario of a LazyRegion that serves forked children, run as a child process by the region-event
        // tests: its EVENT_FORK userfaultfd must not live in the test runner, where every other test's fork would wait on it.
        .executableTarget(
            name: "uffd-forked-region",
            dependencies: ["Userfaultfd", "CUserfaultfdTestSupport"],
            path: "Tests/ForkedRegion",
            swiftSettings: strictConcurrency
        ),
        // Imports only the core: `.ci/run` checks with ldd that it links no Foundation, FoundationNetworking or libcurl.
        .executableTarget(
            name: "uffd-link-check",
            dependencies: ["Userfaultfd"],
            path: "Tests/LinkCheck",
            swiftSettings: strictConcurrency
        ),
        .testTarget(
            name: "UserfaultfdTests",
            dependencies: ["Userfaultfd", "UserfaultfdHTTP", "UserfaultfdFirecracker", "UffdTool", "CUserfaultfd", "CUserfaultfdTestSupport", "UserfaultfdBenchSupport", "uffd-fake-vmm",
                           "uffd-forked-region"],
            swiftSettings: strictConcurrency
        ),
    ]
)
