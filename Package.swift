// swift-tools-version:6.0
//
// swift-userfaultfd: take over your own page faults on Linux, asynchronously.
//
// The library has no package dependencies: only the toolchain (Glibc, Dispatch, Foundation, Synchronization)
// and its own C shim for what Swift cannot import (variadic ioctl/syscall, the _IOWR macros, structs newer than
// the system's linux/userfaultfd.h).

import PackageDescription

let strictConcurrency: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
    .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
    name: "swift-userfaultfd",
    products: [
        .library(name: "Userfaultfd", targets: ["Userfaultfd"]),
        .executable(name: "uffd", targets: ["uffd"]),
        // The C reference of the benchmarks, shared by `uffd bench` and the Benchmarks/ package.
        .library(name: "CUserfaultfdBaseline", targets: ["CUserfaultfdBaseline"]),
    ],
    targets: [
        // Layer 0: the C shim. Ioctl numbers, kernel structs and non-variadic wrappers.
        .target(name: "CUserfaultfd"),

        // Layers 1–3: core (UserfaultFD, FaultEvent, events), resolution, providers.
        .target(
            name: "Userfaultfd",
            dependencies: ["CUserfaultfd"],
            swiftSettings: strictConcurrency
        ),

        // The benchmarks' C reference: userfaultfd(2)'s poll/read/COPY handler (used by `uffd bench` and Benchmarks/).
        .target(name: "CUserfaultfdBaseline"),

        // Layer 4: the command-line tool. Its commands live in a library so tests can drive them.
        .target(
            name: "UffdTool",
            dependencies: ["Userfaultfd", "CUserfaultfdBaseline"],
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
        .testTarget(
            name: "UserfaultfdTests",
            dependencies: ["Userfaultfd", "UffdTool", "CUserfaultfd", "CUserfaultfdTestSupport", "uffd-fake-vmm",
                           "uffd-forked-region"],
            swiftSettings: strictConcurrency
        ),
    ]
)
