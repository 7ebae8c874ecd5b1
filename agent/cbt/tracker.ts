import type { ChangeBitmap } from './change-bitmap.js';

/**
 * A changed-block tracker: records which chunks of one block device were
 * written, in numbered *generations* cut at snapshots, and knows when it
 * cannot vouch for a generation.
 *
 * The promise a Tracker makes: for a generation G reported valid, every
 * chunk whose content differs between the snapshot that opened G and the
 * snapshot that closed it has its bit set. Extra bits are allowed (a write
 * spanning a chunk boundary, a write racing a snapshot, a write of identical
 * bytes); a missing bit never is. Whenever the tracker cannot keep that
 * promise (lost kernel events, an unparseable record, a write beyond the
 * tracked size, a restart without proof of no untracked writes) it reports
 * the generation invalid with a human-readable reason, and the caller falls
 * back to a full digest comparison.
 *
 * Lifecycle and contract:
 * - `start(opts)` begins tracking and opens generation `opts.generation`.
 *   Without `opts.initial` that generation is invalid ("started without a
 *   saved bitmap"): writes before start were not seen. With `opts.initial`
 *   (a bitmap resumed from a clean shutdown) it starts from those bits and is
 *   valid, unless the device's identity or size differs from the one saved or
 *   `opts.invalidReason` is given. Proving that nothing was written between
 *   the shutdown and this start is the caller's part (TrackerState compares
 *   `startInfo.counters` with the saved ones and calls invalidate()).
 *   start() throws BlocksnapError(E_TRACKER) if it cannot track; then nothing
 *   is left behind. `startInfo` is available after start.
 * - At a snapshot: `await prepareSwitch()` BEFORE the freeze, then
 *   `await completeSwitch()` AFTER the snapshot exists. From prepareSwitch on,
 *   every write is recorded in both the open generation G and the next one
 *   G+1; completeSwitch drains every write queued before it was called into
 *   the bitmaps, closes G and returns it. G+1 is then the open generation,
 *   valid unless something was lost while it was open. A write racing the
 *   snapshot therefore lands in both G and G+1: a superset, never a gap (see
 *   the argument in tracefs-tracker.ts).
 * - `abortSwitch()` after prepareSwitch when the snapshot failed: G stays
 *   open with everything recorded; nothing is lost.
 * - prepareSwitch twice, completeSwitch/abortSwitch without prepareSwitch, or
 *   any call after stop throws E_TRACKER.
 * - The caller keeps a closed generation's bitmap until the image built from
 *   it is committed; if that job fails, `absorb(closed)` unions it back into
 *   the open generation (validity combines: both must be valid), so the open
 *   generation always covers every change since the last committed image.
 * - `validity()` is the open generation's current validity (cheap, no I/O).
 *   `invalidate(reason)` makes the open generation(s) invalid; the first
 *   reason wins (later ones are logged by the implementation, not kept).
 * - `checkpoint()` drains pending events and returns a copy of the open
 *   generation with the device's identity and I/O counters, for
 *   persistence. The counters are read BEFORE the drain, so every write
 *   they count is in the returned bitmap.
 * - `stop()` takes a final checkpoint, stops tracking and releases every
 *   kernel resource. Idempotent: a second call returns the same checkpoint.
 */
export type Validity = { valid: true } | { valid: false; reason: string };

export const VALID: Validity = Object.freeze({ valid: true }) as Validity;

export function invalid(reason: string): Validity {
  return { valid: false, reason };
}

/** What identifies the device a bitmap belongs to. */
export interface DeviceIdentity {
  major: number;
  minor: number;
  /** Bytes. */
  size: number;
  /**
   * Kernel disk sequence number (/sys/block/X/diskseq, Linux >= 5.15): new
   * for every attach of a loop device, so a detach + re-attach of the same
   * minor is seen. 0 when the kernel does not expose it.
   */
  diskseq: number;
}

/**
 * Completed write/discard I/O counters of the device (/sys/dev/block/M:m/stat).
 * Equal counters at stop and at the next start prove that no write reached
 * the device while it was not tracked.
 */
export interface IoCounters {
  writeIos: number;
  writeSectors: number;
  discardIos: number;
  discardSectors: number;
  /** Write requests in flight when the counters were read. */
  writesInFlight: number;
  /** False when the device does not account I/O (queue/iostats = 0). */
  available: boolean;
}

export interface TrackerStartOptions {
  /** Block device path, e.g. /dev/loop3. */
  device: string;
  /** Power of two >= 512. */
  chunkSize: number;
  /** Number of the generation start() opens. */
  generation: number;
  /**
   * Bits resumed from a clean shutdown, with the identity of the device they
   * were saved for. The tracker compares that identity with the live device
   * and, on any difference, opens the generation empty and invalid instead.
   */
  initial?: { bitmap: ChangeBitmap; identity: DeviceIdentity };
  /** Open the first generation invalid with this reason. */
  invalidReason?: string;
}

export interface StartInfo {
  identity: DeviceIdentity;
  /** Read after tracking was live: compare with the saved counters. */
  counters: IoCounters;
}

export interface ClosedGeneration {
  generation: number;
  bitmap: ChangeBitmap;
  validity: Validity;
}

export interface TrackerCheckpoint extends ClosedGeneration {
  identity: DeviceIdentity;
  counters: IoCounters;
  chunkSize: number;
}

export type TrackerPhase = 'new' | 'tracking' | 'switching' | 'stopped';

export interface Tracker {
  readonly kind: string;
  readonly phase: TrackerPhase;
  /** The open generation's number (G while switching). */
  readonly generation: number;
  readonly startInfo: StartInfo;
  start(opts: TrackerStartOptions): Promise<void>;
  prepareSwitch(): Promise<void>;
  completeSwitch(): Promise<ClosedGeneration>;
  abortSwitch(): Promise<void>;
  /** Unions a closed generation whose image was not committed back into the open one (see Generations.absorb). */
  absorb(closed: ClosedGeneration): void;
  validity(): Validity;
  invalidate(reason: string): void;
  checkpoint(): Promise<TrackerCheckpoint>;
  stop(): Promise<TrackerCheckpoint>;
}
