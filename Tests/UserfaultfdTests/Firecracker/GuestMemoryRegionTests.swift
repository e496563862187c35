import Testing
import Userfaultfd
import UserfaultfdFirecracker

@Suite("Firecracker handshake parsing")
struct GuestMemoryRegionTests {
    let fileSize = 8 << 20

    func parse(_ json: String) throws(FirecrackerHandshakeError) -> [GuestMemoryRegion] {
        try GuestMemoryRegion.parse(Array(json.utf8), memoryFileSize: fileSize)
    }

    func expectRejected(_ json: String, _ matches: (FirecrackerHandshakeError) -> Bool, sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            let regions = try parse(json)
            Issue.record("accepted \(json) as \(regions)", sourceLocation: sourceLocation)
        } catch {
            #expect(matches(error), "unexpected error \(error) for \(json)", sourceLocation: sourceLocation)
            #expect(!error.description.isEmpty)
        }
    }

    @Test func currentFormWithBothPageSizeFields() throws {
        let regions = try parse(#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096},{"base_host_virt_addr":1048576,"size":4096,"offset":8192,"page_size":4096,"page_size_kib":4096}]"#)
        #expect(regions == [
            GuestMemoryRegion(baseHostVirtualAddress: 4096, size: 8192, offset: 0, pageSize: 4096),
            GuestMemoryRegion(baseHostVirtualAddress: 1_048_576, size: 4096, offset: 8192, pageSize: 4096),
        ])
    }

    @Test func pageSizeKibHoldsBytes() throws {
        let regions = try parse(#"[{"base_host_virt_addr":2097152,"size":4194304,"offset":0,"page_size_kib":2097152}]"#)
        #expect(regions.first?.pageSize == 2 << 20)
    }

    @Test func legacyFormImpliesFourKiB() throws {
        let regions = try parse(#"[{"base_host_virt_addr":8192,"size":4096,"offset":4096,"extra":"ignored"}]"#)
        #expect(regions == [GuestMemoryRegion(baseHostVirtualAddress: 8192, size: 4096, offset: 4096, pageSize: 4096)])
    }

    @Test func malformedBodiesAreTypedErrors() {
        func invalidJSON(_ error: FirecrackerHandshakeError) -> Bool { if case .invalidJSON = error { true } else { false } }
        func invalidField(_ error: FirecrackerHandshakeError) -> Bool { if case .invalidField = error { true } else { false } }
        expectRejected("[{", invalidJSON)
        expectRejected(#"{"base_host_virt_addr":0}"#, invalidJSON)
        expectRejected("", invalidJSON)
        expectRejected("[]") { $0 == .noRegions }
        expectRejected(#"[{"size":4096,"offset":0}]"#, invalidField)
        expectRejected(#"[{"base_host_virt_addr":-4096,"size":4096,"offset":0}]"#, invalidJSON)
        expectRejected(#"[{"base_host_virt_addr":4096.5,"size":4096,"offset":0}]"#, invalidJSON)
        expectRejected(#"[{"base_host_virt_addr":true,"size":4096,"offset":0}]"#, invalidJSON)
        expectRejected(#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":2097152}]"#, invalidField)
    }

    @Test func unsupportedAndMisalignedRegions() {
        expectRejected(#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":12345}]"#) {
            $0 == .unsupportedPageSize(region: 0, pageSize: 12345)
        }
        expectRejected(#"[{"base_host_virt_addr":4097,"size":4096,"offset":0}]"#) { if case .misaligned(0, _) = $0 { true } else { false } }
        expectRejected(#"[{"base_host_virt_addr":4096,"size":0,"offset":0}]"#) { if case .misaligned(0, _) = $0 { true } else { false } }
        expectRejected(#"[{"base_host_virt_addr":2097152,"size":4096,"offset":0,"page_size":2097152}]"#) {
            if case .misaligned(0, _) = $0 { true } else { false }
        }
        expectRejected(#"[{"base_host_virt_addr":4096,"size":4096,"offset":0},{"base_host_virt_addr":2097152,"size":2097152,"offset":4096,"page_size":2097152}]"#) {
            if case .invalidField(_, "page_size", _) = $0 { true } else { false }
        }
    }

    @Test func regionsOutsideTheFileOrOverlapping() {
        expectRejected(#"[{"base_host_virt_addr":4096,"size":8192,"offset":8384512}]"#) { if case .outsideMemoryFile(0, _) = $0 { true } else { false } }
        expectRejected(#"[{"base_host_virt_addr":4096,"size":4096,"offset":18446744073709551615}]"#) {
            if case .invalidField(0, "offset", _) = $0 { true } else { false }
        }
        expectRejected(#"[{"base_host_virt_addr":4096,"size":8192,"offset":0},{"base_host_virt_addr":8192,"size":4096,"offset":8192}]"#) {
            if case .overlapping(0, 1, _) = $0 { true } else { false }
        }
        expectRejected(#"[{"base_host_virt_addr":4096,"size":8192,"offset":0},{"base_host_virt_addr":65536,"size":4096,"offset":4096}]"#) {
            if case .overlapping(0, 1, let detail) = $0 { detail.contains("file") } else { false }
        }
    }
}
