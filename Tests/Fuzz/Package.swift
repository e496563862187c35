// swift-tools-version:6.0
//
// libFuzzer targets for everything swift-userfaultfd parses from outside: uffd_msg decoding, the Firecracker
// handshake body, and the control messages (SCM_RIGHTS) received with a passed userfaultfd. Built only with the fuzzer:
//
//     swift build -c debug -Xswiftc -sanitize=fuzzer,address -Xcc -fsanitize=fuzzer-no-link,address --scratch-path .build-fuzz
//     .build-fuzz/debug/fuzz-fault-message -runs=100000 Corpus/fault-message
//
// (`-Xcc` instruments the library's C shim too: fuzz-fd-message runs its control-message parser.)
//
// (libFuzzer provides `main`, so a plain `swift build` of this package does not link; it is its own package so that
// it never affects the library's build.) See the Reliability article of the Userfaultfd documentation
// (../../Sources/Userfaultfd/Userfaultfd.docc/Reliability.md).

import PackageDescription

let settings: [SwiftSetting] = [.swiftLanguageMode(.v6), .unsafeFlags(["-parse-as-library"])]
let targetDependencies: [Target.Dependency] = [.product(name: "Userfaultfd", package: "swift-userfaultfd"), "FuzzDriver"]
// The handshake body is the page server's: that target also needs its layer.
let handshakeDependencies = targetDependencies + [.product(name: "UserfaultfdFirecracker", package: "swift-userfaultfd")]

let package = Package(
    name: "swift-userfaultfd-fuzz",
    dependencies: [.package(name: "swift-userfaultfd", path: "../..")],
    targets: [
        // What every target shares: handing the command line to libFuzzer's driver.
        .target(name: "FuzzDriver", path: "Sources/FuzzDriver", swiftSettings: [.swiftLanguageMode(.v6)]),
        .executableTarget(name: "fuzz-fault-message", dependencies: targetDependencies,
                          path: "Sources/FuzzFaultMessage", swiftSettings: settings),
        .executableTarget(name: "fuzz-handshake", dependencies: handshakeDependencies,
                          path: "Sources/FuzzHandshake", swiftSettings: settings),
        .executableTarget(name: "fuzz-fd-message", dependencies: targetDependencies,
                          path: "Sources/FuzzFdMessage", swiftSettings: settings),
    ]
)
