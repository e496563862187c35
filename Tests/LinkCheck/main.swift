// A program that imports only the core library, for the CI step "the core links no Foundation" (.ci/run): the layers'
// promise is that using `Userfaultfd` costs no Foundation, no FoundationNetworking and no libcurl. SwiftPM links every
// object file of the targets this one depends on, so anything `Userfaultfd` imports shows up in this binary's `ldd`.
import Userfaultfd

do {
    let offered = try UserfaultFD.probeFeatures()
    print("userfaultfd offers \(offered.features.rawValue == 0 ? "no" : "some") features; dirty tracking would use",
          DirtyTrackingEngine.best(for: offered.features))
} catch {
    print("userfaultfd unavailable here: \(error)")
}
