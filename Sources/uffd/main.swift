import Foundation
import UffdTool

// Everything runs in UffdTool (nonisolated library code): Dispatch handlers built here, in main.swift's
// @MainActor context, would trap when run on another queue.
exit(await UffdCommand.run(Array(CommandLine.arguments.dropFirst())))
