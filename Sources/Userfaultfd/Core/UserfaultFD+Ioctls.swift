import CUserfaultfd
import Glibc

/// Options of ``UserfaultFD/copy(from:to:length:mode:)`` (`UFFDIO_COPY_MODE_*`).
public struct CopyMode: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// Don't wake the faulting threads; wake them later with ``UserfaultFD/wake(_:)`` (one wake for a batch).
    public static let dontWake = CopyMode(rawValue: 1 << 0)
    /// Map the copied pages write-protected (needs a range registered with ``RegistrationMode/writeProtect``).
    public static let writeProtect = CopyMode(rawValue: 1 << 1)
}

/// Options of ``UserfaultFD/move(from:to:length:mode:)`` (`UFFDIO_MOVE_MODE_*`).
public struct MoveMode: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// Don't wake the faulting threads.
    public static let dontWake = MoveMode(rawValue: 1 << 0)
    /// Holes in the source are not an error: the matching destination pages stay missing.
    public static let allowSourceHoles = MoveMode(rawValue: 1 << 1)
}

extension UserfaultFD {
    // MARK: Registration

    /// Registers a page-aligned range so that faults in it are reported by this userfaultfd.
    ///
    /// - Returns: the ioctls the kernel supports on this range (anonymous MISSING: copy, zero page, move, wake, poison...).
    ///   Unknown bits are kept.
    /// - Throws: ``UserfaultError/Code/invalidArgument`` for an unaligned or empty range, an empty mode, or a mode the
    ///   memory does not support (MINOR on anonymous memory) and for unmapped memory; ``UserfaultError/Code/busy`` when
    ///   another userfaultfd owns the range.
    @discardableResult
    public func register(_ range: MemoryRange, mode: RegistrationMode) throws(UserfaultError) -> UserfaultIoctls {
        try checkAligned(range, .register)
        guard !mode.isEmpty else {
            throw UserfaultError(.invalidArgument, operation: .register, range: range, detail: "the mode is empty")
        }
        return try lease.withDescriptor(.register, range: range) { descriptor throws(UserfaultError) in
            var argument = cuffd_register(range: cuffd_range(range), mode: mode.rawValue, ioctls: 0)
            guard retryingInterrupts({ cuffd_ioctl_register(descriptor, &argument) }) == 0 else {
                let error = Glibc.errno
                throw UserfaultError(operation: .register, errno: error, range: range,
                                     detail: error == EINVAL ? "mode \(mode) on memory that is unmapped or does not support it" : "")
            }
            return UserfaultIoctls(rawValue: argument.ioctls)
        }
    }

    /// Unregisters a page-aligned range. Threads blocked on MISSING faults in it are woken and retry as ordinary memory.
    public func unregister(_ range: MemoryRange) throws(UserfaultError) {
        try rangeIoctl(.unregister, range) { cuffd_ioctl_unregister($0, $1) }
    }

    /// Wakes threads blocked on faults in a range (after resolving with `dontWake`, or when a page turned out present).
    public func wake(_ range: MemoryRange) throws(UserfaultError) {
        try rangeIoctl(.wake, range) { cuffd_ioctl_wake($0, $1) }
    }

    // MARK: Resolution

    /// Atomically copies `length` bytes from `source` into missing pages at `destination` and wakes the faulting threads.
    ///
    /// - Parameters:
    ///   - source: any readable memory (need not be aligned).
    ///   - destination: page-aligned start of the pages to fill, inside a range registered ``RegistrationMode/missing``.
    ///   - length: a non-zero multiple of the page size.
    ///   - mode: ``CopyMode`` flags: leave the faulting threads asleep, or install the pages write-protected.
    /// - Returns: the bytes copied (`length`).
    /// - Throws: ``UserfaultError/Code/pageExists`` if the first page is already present;
    ///   ``UserfaultError/Code/tryAgain(bytesCompleted:)`` when the kernel stopped early (a page in the middle was present,
    ///   or a non-fault event is unread): the first `bytesCompleted` bytes were copied and woken, the rest was not.
    @discardableResult
    public func copy(
        from source: UnsafeRawPointer, to destination: UInt, length: Int, mode: CopyMode = []
    ) throws(UserfaultError) -> Int {
        let range = MemoryRange(start: destination, length: length)
        try checkAligned(range, .copy)
        return try lease.withDescriptor(.copy, range: range) { descriptor throws(UserfaultError) in
            var argument = cuffd_copy(
                dst: UInt64(destination), src: UInt64(UInt(bitPattern: source)), len: UInt64(length),
                mode: mode.rawValue, copy: 0)
            return try resolving(.copy, range) {
                argument.copy = 0
                return (cuffd_ioctl_copy(descriptor, &argument), argument.copy)
            }
        }
    }

    /// Maps the shared zero page at missing pages of a range (anonymous and shmem memory) and wakes the faulting threads.
    /// - Returns: the bytes mapped.
    @discardableResult
    public func zeroPage(_ range: MemoryRange, wake: Bool = true) throws(UserfaultError) -> Int {
        try checkAligned(range, .zeroPage)
        return try lease.withDescriptor(.zeroPage, range: range) { descriptor throws(UserfaultError) in
            var argument = cuffd_zeropage(range: cuffd_range(range), mode: wake ? 0 : 1, zeropage: 0)
            return try resolving(.zeroPage, range) {
                argument.zeropage = 0
                return (cuffd_ioctl_zeropage(descriptor, &argument), argument.zeropage)
            }
        }
    }

    /// Turns write protection on or off for a range registered ``RegistrationMode/writeProtect``.
    ///
    /// Turning it off resolves write-protect faults; unless `wake` is false the blocked writers are woken.
    /// (The kernel does not accept `wake: false` together with `enabled: true`; the wake flag only matters when un-protecting.)
    public func writeProtect(_ range: MemoryRange, enabled: Bool, wake: Bool = true) throws(UserfaultError) {
        var mode: UInt64 = enabled ? 1 : 0
        if !wake && !enabled { mode |= 2 }
        try rangeIoctl(.writeProtect, range) { descriptor, cRange in
            var argument = cuffd_writeprotect(range: cRange.pointee, mode: mode)
            return cuffd_ioctl_writeprotect(descriptor, &argument)
        }
    }

    /// Maps pages already in the page cache (MINOR faults on shmem or hugetlbfs) and wakes the faulting threads.
    /// - Parameters:
    ///   - range: the page-aligned pages to map, inside a range registered ``RegistrationMode/minor``.
    ///   - wake: wake the faulting threads (`false` sets `UFFDIO_CONTINUE_MODE_DONTWAKE`; wake them later with ``wake(_:)``).
    ///   - writeProtect: map them write-protected (`UFFDIO_CONTINUE_MODE_WP`).
    /// - Returns: the bytes mapped.
    @discardableResult
    public func `continue`(_ range: MemoryRange, wake: Bool = true, writeProtect: Bool = false) throws(UserfaultError) -> Int {
        try checkAligned(range, .continue)
        return try lease.withDescriptor(.continue, range: range) { descriptor throws(UserfaultError) in
            let mode: UInt64 = (wake ? 0 : 1) | (writeProtect ? 2 : 0)
            var argument = cuffd_continue(range: cuffd_range(range), mode: mode, mapped: 0)
            return try resolving(.continue, range) {
                argument.mapped = 0
                return (cuffd_ioctl_continue(descriptor, &argument), argument.mapped)
            }
        }
    }

    /// Marks missing pages poisoned: any later access raises SIGBUS (`BUS_ADRERR`) in the accessing thread, as for a file
    /// whose disk failed. Wakes the faulting threads, which then take the SIGBUS.
    /// - Returns: the bytes poisoned.
    @discardableResult
    public func poison(_ range: MemoryRange, wake: Bool = true) throws(UserfaultError) -> Int {
        try checkAligned(range, .poison)
        return try lease.withDescriptor(.poison, range: range) { descriptor throws(UserfaultError) in
            var argument = cuffd_poison(range: cuffd_range(range), mode: wake ? 0 : 1, updated: 0)
            return try resolving(.poison, range) {
                argument.updated = 0
                return (cuffd_ioctl_poison(descriptor, &argument), argument.updated)
            }
        }
    }

    /// Moves pages (no copy) from `source` to missing pages at `destination`, both private anonymous memory of the
    /// calling process, and wakes the faulting threads.
    /// - Returns: the bytes moved.
    /// - Throws: ``UserfaultError/Code/notRegistered`` for a hole in the source (unless `allowSourceHoles`),
    ///   ``UserfaultError/Code/busy`` for a shared source page, partial progress as for copy.
    @discardableResult
    public func move(from source: UInt, to destination: UInt, length: Int, mode: MoveMode = []) throws(UserfaultError) -> Int {
        let range = MemoryRange(start: destination, length: length)
        try checkAligned(range, .move)
        try checkAligned(MemoryRange(start: source, length: length), .move)
        return try lease.withDescriptor(.move, range: range) { descriptor throws(UserfaultError) in
            var argument = cuffd_move(dst: UInt64(destination), src: UInt64(source), len: UInt64(length), mode: mode.rawValue, move: 0)
            return try resolving(.move, range) {
                argument.move = 0
                return (cuffd_ioctl_move(descriptor, &argument), argument.move)
            }
        }
    }

    // MARK: Helpers

    /// Rejects unaligned and empty ranges before the kernel sees them, with a message that says which.
    @inline(__always)
    func checkAligned(_ range: MemoryRange, _ operation: UserfaultError.Operation) throws(UserfaultError) {
        guard range.length > 0, range.isAligned(to: pageSize), range.end > range.start else {
            throw UserfaultError(.invalidArgument, operation: operation, range: range,
                                 detail: range.length <= 0 ? "the length must be positive"
                                    : "start and length must be multiples of the page size (\(pageSize))")
        }
    }

    private func rangeIoctl(
        _ operation: UserfaultError.Operation, _ range: MemoryRange,
        _ call: (Int32, UnsafeMutablePointer<cuffd_range>) -> Int32
    ) throws(UserfaultError) {
        try checkAligned(range, operation)
        try lease.withDescriptor(operation, range: range) { descriptor throws(UserfaultError) in
            var argument = cuffd_range(range)
            guard retryingInterrupts({ call(descriptor, &argument) }) == 0 else {
                throw UserfaultError(operation: operation, errno: Glibc.errno, range: range)
            }
        }
    }
}

/// Runs a resolving ioctl whose argument ends in a result field (bytes done, or -errno) and turns the outcome into bytes
/// or a typed error. EINTR with no progress is retried; progress followed by an error is reported as
/// ``UserfaultError/Code/tryAgain(bytesCompleted:)`` so the caller resolves the rest.
@inline(__always)
private func resolving(
    _ operation: UserfaultError.Operation, _ range: MemoryRange, _ call: () -> (status: Int32, result: Int64)
) throws(UserfaultError) -> Int {
    while true {
        let (status, result) = call()
        if status == 0 { return range.length }
        let error = Glibc.errno
        let done = result > 0 ? Int(result) : 0
        if error == EINTR && done == 0 { continue }
        if done > 0 {
            throw UserfaultError(.tryAgain(bytesCompleted: done), operation: operation, errno: error, range: range)
        }
        throw UserfaultError(operation: operation, errno: error, range: range)
    }
}

extension cuffd_range {
    init(_ range: MemoryRange) {
        self.init(start: UInt64(range.start), len: UInt64(range.length))
    }
}
