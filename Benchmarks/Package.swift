// swift-tools-version:6.1
//
// The benchmarks of swift-userfaultfd, a package of their own so that the library keeps no package dependencies.
// Run from this directory: `swift package benchmark` (see README.md).

import PackageDescription

let package = Package(
    name: "swift-userfaultfd-benchmarks",
    platforms: [.macOS(.v13)],
    dependencies: [
        .package(name: "swift-userfaultfd", path: ".."),
        .package(url: "https://github.com/ordo-one/benchmark.git", exact: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "UserfaultfdBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "Userfaultfd", package: "swift-userfaultfd"),
                .product(name: "CUserfaultfdBaseline", package: "swift-userfaultfd"),
                .product(name: "UserfaultfdBenchSupport", package: "swift-userfaultfd"),
            ],
            path: "Benchmarks/UserfaultfdBenchmarks",
            swiftSettings: [.swiftLanguageMode(.v6)],
            plugins: [
                .plugin(name: "BenchmarkPlugin", package: "benchmark")
            ]
        )
    ]
)
