import { BlocksnapError, isBlocksnapError } from '../../proto/errors.js';
import type { Logger } from '../../proto/shared/log.js';
import { readBitmapFile, writeBitmapFile, type BitmapFileContent, type SavedCounters } from './bitmap-file.js';
import { type IoCounters, type Tracker, type TrackerCheckpoint, type Validity } from './tracker.js';

/**
 * Persistence of a tracker's open generation across agent restarts.
 *
 * A saved bitmap is trusted at the next start only if ALL of these hold,
 * otherwise the first generation opens invalid with the matching reason:
 * - the file exists and passes its checks (magic, version, checksum);
 * - it carries the clean-shutdown flag: only stop() writes it. Right after
 *   start the file is overwritten WITHOUT the flag, and periodic saves keep
 *   it that way, so a crash or kill -9 at any later point leaves a file
 *   that says "not clean" — never an older clean file that would be
 *   believed;
 * - tracking was valid when it was saved;
 * - its generation is the one the caller expects (anything else is a gap:
 *   a switch happened that the file did not see, or the file is stale);
 * - same device (major:minor, diskseq: a detach + re-attach is a new disk),
 *   same size, same chunk size (checked by the tracker at start);
 * - the device's completed write/discard counters, read after tracking is
 *   live again, equal the ones saved at stop (read before the final drain),
 *   and no write was in flight: nothing reached the device while untracked.
 *   A device without I/O accounting cannot prove that and is not trusted.
 */
export interface TrackerStateOptions {
  /** The bitmap file, e.g. STATE/volumes/<volume>.cbt */
  file: string;
  tracker: Tracker;
  device: string;
  chunkSize: number;
  /** The generation the agent's records say should be open now. */
  expectedGeneration: number;
  /** Period of the (not clean) background saves; 0 disables them. */
  saveIntervalMs?: number;
  log?: Logger;
}

export class TrackerState {
  private timer: NodeJS.Timeout | null = null;
  private saving: Promise<void> = Promise.resolve();
  private closed = false;

  private constructor(
    private readonly opts: TrackerStateOptions,
    /** Whether the saved bitmap was resumed, and if not, why. */
    readonly resume: Validity,
  ) {}

  get tracker(): Tracker {
    return this.opts.tracker;
  }

  /** Loads the saved bitmap, starts the tracker, verifies, and marks the file not clean. */
  static async open(opts: TrackerStateOptions): Promise<TrackerState> {
    let saved: BitmapFileContent | null = null;
    let reason: string | null = null;
    try {
      saved = await readBitmapFile(opts.file);
      if (saved === null) reason = 'no saved bitmap: first start or agent state lost';
    } catch (e) {
      if (!isBlocksnapError(e, 'E_FORMAT')) throw e;
      reason = `saved bitmap unusable: ${e.message}`;
    }
    if (saved && reason === null) reason = fileReason(saved, opts.expectedGeneration);
    const usable = saved !== null && reason === null;
    await opts.tracker.start({
      device: opts.device,
      chunkSize: opts.chunkSize,
      generation: opts.expectedGeneration,
      ...(usable ? { initial: { bitmap: saved!.bitmap, identity: saved!.identity } } : {}),
      ...(reason !== null ? { invalidReason: reason } : {}),
    });
    if (usable) {
      const why = counterReason(saved!.counters, opts.tracker.startInfo.counters);
      if (why !== null) opts.tracker.invalidate(why);
    }
    const resume = opts.tracker.validity();
    const state = new TrackerState(opts, resume);
    opts.log?.info({ file: opts.file, resumed: resume.valid, reason: resume.valid ? undefined : resume.reason }, 'change tracking resumed');
    try {
      await state.save();
    } catch (e) {
      await opts.tracker.stop().catch(() => {});
      throw e;
    }
    const every = opts.saveIntervalMs ?? 60_000;
    if (every > 0) {
      state.timer = setInterval(() => {
        state.save().catch((e) => opts.log?.error({ err: e, file: opts.file }, 'periodic bitmap save failed'));
      }, every);
      state.timer.unref();
    }
    return state;
  }

  /** Saves the open generation, marked not clean. Serialised with other saves. */
  async save(): Promise<void> {
    if (this.closed) throw new BlocksnapError('E_TRACKER', 'tracker state is closed');
    const run = this.saving.then(async () => {
      const cp = await this.opts.tracker.checkpoint();
      await writeBitmapFile(this.opts.file, toFile(cp, false));
    });
    this.saving = run.catch(() => {});
    return run;
  }

  /** Stops the tracker and saves its last checkpoint with the clean-shutdown flag. */
  async close(): Promise<TrackerCheckpoint> {
    if (this.closed) throw new BlocksnapError('E_TRACKER', 'tracker state is already closed');
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
    await this.saving;
    const cp = await this.opts.tracker.stop();
    await writeBitmapFile(this.opts.file, toFile(cp, true));
    this.opts.log?.info({ file: this.opts.file, generation: cp.generation, valid: cp.validity.valid }, 'bitmap saved (clean)');
    return cp;
  }
}

function fileReason(saved: BitmapFileContent, expectedGeneration: number): string | null {
  if (!saved.clean) {
    return `agent did not shut down cleanly (last save ${saved.savedAt.toISOString()}): writes after it are unknown`;
  }
  if (saved.generation !== expectedGeneration) {
    return `generation gap: saved generation ${saved.generation}, expected ${expectedGeneration}`;
  }
  if (saved.invalidReason !== null) return `tracking was already invalid at shutdown: ${saved.invalidReason}`;
  return null;
}

function counterReason(saved: SavedCounters | null, now: IoCounters): string | null {
  if (saved === null || !now.available) {
    return 'device I/O statistics unavailable: cannot prove nothing was written while untracked';
  }
  const dw = now.writeIos - saved.writeIos;
  const dd = now.discardIos - saved.discardIos;
  // Sectors, not I/O counts, decide: a cache flush is accounted as a write I/O of 0 sectors, and any
  // `sync` on the host sends one to every idle ext4 (even a frozen one); it changes no block.
  if (now.writeSectors !== saved.writeSectors || now.discardSectors !== saved.discardSectors) {
    return `device written while untracked: ${dw} write and ${dd} discard I/Os since the clean shutdown`;
  }
  if (now.writesInFlight > 0) return `${now.writesInFlight} writes were in flight when tracking started`;
  return null;
}

function toFile(cp: TrackerCheckpoint, clean: boolean): BitmapFileContent {
  const v: Validity = cp.validity;
  return {
    identity: cp.identity,
    chunkSize: cp.chunkSize,
    generation: cp.generation,
    clean,
    invalidReason: v.valid ? null : v.reason,
    counters: cp.counters.available
      ? {
          writeIos: cp.counters.writeIos,
          writeSectors: cp.counters.writeSectors,
          discardIos: cp.counters.discardIos,
          discardSectors: cp.counters.discardSectors,
        }
      : null,
    savedAt: new Date(),
    bitmap: cp.bitmap,
  };
}

