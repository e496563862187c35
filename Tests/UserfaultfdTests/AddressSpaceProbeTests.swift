import CUserfaultfdTestSupport
import Glibc
import Testing
import Userfaultfd

/// `UserfaultFD.addressSpaceHasExited(probing:)`: false for a live address space, whatever state the page is in, and
/// it changes nothing; true once the process behind the userfaultfd has exited.
@Suite("Address space probe")
struct AddressSpaceProbeTests {
    /// This process: a missing page stays missing (a copy afterwards installs it), a present page keeps its bytes.
    @Test(.timeLimit(.minutes(1)))
    func aLiveAddressSpaceIsSeenAliveAndUntouched() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD()
            let mapping = try scope.makeMapping(pages: 2)
            try uffd.register(mapping.range, mode: .missing)
            #expect(!uffd.addressSpaceHasExited(probing: mapping.page(0)), "missing page (EFAULT)")
            // Still missing: a copy there succeeds, where a page the probe had installed would give EEXIST.
            let bytes = sourcePage(0x5c)
            try bytes.withUnsafeBytes { _ = try uffd.copy(from: $0.baseAddress!, to: mapping.page(0), length: systemPageSize) }
            #expect(!uffd.addressSpaceHasExited(probing: mapping.page(0)), "present page (EEXIST)")
            #expect(peek(mapping.page(0) + 100) == 0x5c)
            uffd.close()
            #expect(!uffd.addressSpaceHasExited(probing: mapping.page(1)), "a closed userfaultfd says nothing")
        }
    }

    /// Another process's userfaultfd (copied in with pidfd_getfd): alive while the child runs, exited after.
    @Test(.timeLimit(.minutes(1)))
    func anExitedChildIsSeenExited() async throws {
        try await withFaultWatchdog(seconds: 30) { scope in
            let child = try await TrackedChild.spawn(scope, pageCount: 4, features: [.pagefaultFlagWP])
            defer { child.closePipes() }
            #expect(!child.uffd.addressSpaceHasExited(probing: child.range.start))
            child.quit()
            #expect(await waitForChild(child.pid, seconds: 10) == 0)
            scope.reaped(child: child.pid)
            #expect(child.uffd.addressSpaceHasExited(probing: child.range.start))
        }
    }
}
