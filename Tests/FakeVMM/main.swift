// uffd-fake-vmm: a stand-in for a Firecracker VMM restoring a snapshot with the "Uffd" memory backend, for tests.
//
// It maps anonymous private guest memory (MAP_HUGETLB for 2 MiB pages), creates a userfaultfd with EVENT_REMOVE,
// registers every region MISSING, connects to the handler's socket and sends ONE message: the JSON region list and the
// userfaultfd (SCM_RIGHTS). Then it reads every page and compares it with the memory file, and optionally inflates a
// "balloon" (MADV_DONTNEED, which sends REMOVE) and checks those pages read back as zeros.
//
// --mode selects a broken or malicious peer instead: invalid-json, no-fd, not-uffd, two-fds, outside-file, overlap,
// bad-page-size, garbage-after, exit-with-pending, legacy-fields, page-size-kib; fault-forever is a VM under load that
// never finishes: 8 threads read random pages and give random ranges back (MADV_DONTNEED), until it is killed;
// close-after-send is a Firecracker before 1.12, which closes its end of the socket right after the handshake and
// then faults as usual; expect-refusal sends a correct handshake and expects the handler to refuse it (closing).
// listener-emfile is not a VMM but the listening side of a full descriptor table (see there).
// --compare FILE compares the guest pages with FILE instead of the memory file (which a test may have truncated).
//
// Exit status: 0 success (for rejection modes: the handler closed the connection), 1 content mismatch, 2 usage or
// setup error, 3 the handler did not react as expected.

import CUserfaultfdTestSupport
import Foundation
import Glibc
import Synchronization
import Userfaultfd

func fail(_ status: Int32, _ message: String) -> Never {
    FileHandle.standardError.write(Data("uffd-fake-vmm: \(message)\n".utf8))
    exit(status)
}

var options: [String: String] = [:]
var flags: Set<String> = []
var arguments = CommandLine.arguments.dropFirst()
while let argument = arguments.popFirst() {
    guard argument.hasPrefix("--") else { fail(2, "unexpected argument \(argument)") }
    if argument == "--balloon" { flags.insert(argument); continue }
    guard let value = arguments.popFirst() else { fail(2, "\(argument) needs a value") }
    options[argument] = value
}
guard let socketPath = options["--socket"], let memoryPath = options["--memory"] else {
    fail(2, "usage: uffd-fake-vmm --socket PATH --memory FILE [--regions N] [--region-size BYTES] [--page-size 4096|2097152] [--mode MODE] [--balloon]")
}
let regionCount = Int(options["--regions"] ?? "2") ?? 2
let pageSize = Int(options["--page-size"] ?? "4096") ?? 4096
let regionSize = Int(options["--region-size"] ?? "\(max(pageSize, 1 << 20))") ?? (1 << 20)
let mode = options["--mode"] ?? "normal"

if mode == "listener-emfile" {
    // Not a VMM: the handler side of a full descriptor table, in a process of its own (the limit is lowered here,
    // never in the test process). Listens on --socket, has three clients connect, fills the descriptor table, and
    // checks that accept() throws descriptorsExhausted after closing one waiting client (which sees end of stream,
    // instead of waiting in the backlog forever), and accepts again once descriptors are free.
    var limit = rlimit(rlim_cur: 64, rlim_max: 64)
    guard setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { fail(2, "setrlimit: errno \(errno)") }
    let result = Mutex<String?>(nil)
    let finished = DispatchSemaphore(value: 0)
    Task.detached {
        defer { finished.signal() }
        func report(_ text: String) { result.withLock { $0 = text } }
        do {
            let listener = try UnixSocketListener(path: socketPath)
            let clients = try (0..<3).map { _ in try UnixSocketConnection.connect(path: socketPath) }
            var fillers: [Int32] = []
            while true {
                let descriptor = open("/dev/null", O_RDONLY | O_CLOEXEC)
                if descriptor < 0 { break }
                fillers.append(descriptor)
            }
            do {
                _ = try await listener.accept()
                return report("FAIL accept succeeded with a full table")
            } catch {
                guard (error as? DescriptorPassingError)?.code == .descriptorsExhausted else {
                    return report("FAIL accept threw \(error)")
                }
            }
            var byte: UInt8 = 0
            let closedClients = clients.filter { read($0.fileDescriptor, &byte, 1) == 0 }.count
            guard closedClients == 1 else { return report("FAIL \(closedClients) clients saw the connection closed, not 1") }
            fillers.prefix(8).forEach { _ = close($0) }
            _ = try await listener.accept()
            report("OK exhausted-then-accepted")
        } catch {
            report("FAIL \(error)")
        }
    }
    if finished.wait(timeout: .now() + 10) == .timedOut { fail(3, "listener-emfile did not finish") }
    let text = result.withLock { $0 } ?? "FAIL no result"
    print(text)
    exit(text.hasPrefix("OK") ? 0 : 3)
}

let comparePath = options["--compare"] ?? memoryPath
guard let memory = FileManager.default.contents(atPath: comparePath) else { fail(2, "cannot read \(comparePath)") }
guard memory.count >= regionCount * regionSize else { fail(2, "memory file smaller than the regions") }

// Guest memory.
let bases: [UInt] = (0..<regionCount).map { _ in
    let flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (pageSize > 4096 ? MAP_HUGETLB : 0)
    let pointer = mmap(nil, regionSize, PROT_READ | PROT_WRITE, flags, -1, 0)
    guard let pointer, pointer != MAP_FAILED else { fail(2, "mmap of \(regionSize) bytes failed: errno \(errno)") }
    return UInt(bitPattern: pointer)
}

let uffd: UserfaultFD
do {
    uffd = try UserfaultFD(requiredFeatures: [.eventRemove])
    for base in bases { try uffd.register(MemoryRange(start: base, length: regionSize), mode: .missing) }
} catch {
    fail(2, "userfaultfd setup: \(error)")
}

// The handshake body, laid out as Firecracker 1.12 does (regions end to end in the file).
func body(_ transform: (Int, inout [String: Any]) -> Void = { _, _ in }) -> [UInt8] {
    var list: [[String: Any]] = []
    for (index, base) in bases.enumerated() {
        var region: [String: Any] = [
            "base_host_virt_addr": base, "size": regionSize, "offset": index * regionSize,
            "page_size": pageSize, "page_size_kib": pageSize,
        ]
        transform(index, &region)
        list.append(region)
    }
    return Array(try! JSONSerialization.data(withJSONObject: list))
}

let connection: UnixSocketConnection
do {
    connection = try UnixSocketConnection.connect(path: socketPath)
} catch {
    fail(2, "connect: \(error)")
}

/// For the modes the handler must refuse: it must close the connection (end of stream) within a few seconds.
func expectRejection() -> Never {
    let closed = DispatchSemaphore(value: 0)
    Thread {
        var buffer = [UInt8](repeating: 0, count: 256)
        while true {
            let count = read(connection.fileDescriptor, &buffer, buffer.count)
            if count == 0 || (count < 0 && errno != EAGAIN && errno != EINTR) { break }
            if count < 0 { usleep(10_000) }
        }
        closed.signal()
    }.start()
    if closed.wait(timeout: .now() + 10) == .timedOut { fail(3, "the handler did not close the connection") }
    print("REJECTED")
    exit(0)
}

if mode == "exit-with-pending" {
    // Fault on a few pages from other threads before the handler has the userfaultfd, so that the faults are certainly
    // pending (queued, unread) when this process hands it over and exits at once: the handler must cope with a VM that
    // vanished with faults outstanding (its resolving ioctls then fail with ESRCH).
    let returned = Mutex(0)
    for index in 0..<4 {
        Thread {
            _ = cuffd_test_read_byte(UnsafeRawPointer(bitPattern: bases[0] + UInt(index * pageSize)))
            returned.withLock { $0 += 1 }
        }.start()
    }
    usleep(50_000)
    guard returned.withLock({ $0 }) == 0 else { fail(2, "a fault returned before the handler had the userfaultfd") }
    do {
        try uffd.send(over: connection, payload: body())
    } catch {
        fail(2, "send: \(error)")
    }
    print("EXITING pending=4")
    fflush(nil)  // _exit skips stdio's buffers: flush them all
    _exit(0)
}

do {
    switch mode {
    case "normal", "garbage-after", "balloon", "fault-forever":
        try uffd.send(over: connection, payload: body())
    case "close-after-send":
        // Firecracker before 1.12: the socket is closed once the regions and the uffd are sent (this process keeps
        // its own copy of the uffd, so its faults still go to the handler).
        try uffd.send(over: connection, payload: body())
        connection.close()
    case "expect-refusal":
        // The handler may close before the message is sent (EPIPE): that is a refusal too.
        try? uffd.send(over: connection, payload: body())
        expectRejection()
    case "legacy-fields":
        try uffd.send(over: connection, payload: body { _, region in
            region["page_size"] = nil
            region["page_size_kib"] = nil
        })
    case "page-size-kib":
        try uffd.send(over: connection, payload: body { _, region in region["page_size"] = nil })
    case "invalid-json":
        try uffd.send(over: connection, payload: Array("[{\"base_host_virt_addr\": 1, \"size\": ".utf8))
        expectRejection()
    case "no-fd":
        try connection.send(body())
        expectRejection()
    case "not-uffd":
        var pipeEnds: [Int32] = [0, 0]
        guard pipe(&pipeEnds) == 0 else { fail(2, "pipe failed") }
        try connection.send(body(), descriptors: [pipeEnds[0]])
        expectRejection()
    case "two-fds":
        try connection.send(body(), descriptors: [uffd.fileDescriptor, uffd.fileDescriptor])
        expectRejection()
    case "outside-file":
        try uffd.send(over: connection, payload: body { index, region in region["offset"] = memory.count - regionSize / 2 + index })
        expectRejection()
    case "overlap":
        try uffd.send(over: connection, payload: body { _, region in region["base_host_virt_addr"] = bases[0] })
        expectRejection()
    case "bad-page-size":
        try uffd.send(over: connection, payload: body { _, region in
            region["page_size"] = 12345
            region["page_size_kib"] = 12345
        })
        expectRejection()
    default:
        fail(2, "unknown mode \(mode)")
    }
} catch {
    fail(2, "handshake: \(error)")
}

if mode == "garbage-after" {
    try? connection.send(Array("\u{0}garbage after the handshake\u{ff}".utf8) + [0xde, 0xad, 0xbe, 0xef])
}

if mode == "fault-forever" {
    // Faults without end, so that whenever the test kills this process some of them are pending in the handler.
    for index in 0..<8 {
        Thread {
            var state = UInt64(index + 1) &* 0x9e37_79b9_7f4a_7c15
            var sum: UInt8 = 0
            while true {
                state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
                let region = Int(state >> 60) % bases.count
                let page = Int((state >> 20) % UInt64(regionSize / pageSize))
                let address = bases[region] + UInt(page * pageSize)
                if index == 0 && state & 7 == 0 {
                    madvise(UnsafeMutableRawPointer(bitPattern: address), pageSize, MADV_DONTNEED)
                } else {
                    // A real load (kept: the sum is printed if the loop ever ends, which it does not).
                    sum &+= UnsafeRawPointer(bitPattern: address)!.load(as: UInt8.self)
                }
                if sum == 1 && state == 0 { print(sum) }
            }
        }.start()
    }
    print("FAULTING")
    fflush(nil)
    while true { pause() }
}

// Read every page and compare it with the memory file.
var mismatches = 0
var pagesChecked = 0
memory.withUnsafeBytes { file in
    for (index, base) in bases.enumerated() {
        for page in stride(from: 0, to: regionSize, by: pageSize) {
            let guest = UnsafeRawPointer(bitPattern: base + UInt(page))!
            if memcmp(guest, file.baseAddress! + index * regionSize + page, pageSize) != 0 { mismatches += 1 }
            pagesChecked += 1
        }
    }
}
guard mismatches == 0 else { fail(1, "\(mismatches) of \(pagesChecked) pages differ from the memory file") }

// Balloon: give back the second half of region 0 (REMOVE), then it must read as zeros.
var zeroPagesChecked = 0
if flags.contains("--balloon") {
    let start = bases[0] + UInt(regionSize / 2)
    guard madvise(UnsafeMutableRawPointer(bitPattern: start), regionSize / 2, MADV_DONTNEED) == 0 else {
        fail(2, "madvise failed: errno \(errno)")
    }
    for page in stride(from: 0, to: regionSize / 2, by: pageSize) {
        let bytes = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: start + UInt(page))!, count: pageSize)
        if bytes.contains(where: { $0 != 0 }) { fail(1, "page at offset \(regionSize / 2 + page) is not zero after the balloon") }
        zeroPagesChecked += 1
    }
}
print("OK pages=\(pagesChecked) zeroPages=\(zeroPagesChecked)")
exit(0)
