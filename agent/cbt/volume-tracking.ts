import { mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { BlocksnapError } from '../../proto/errors.js';
import { writeFileDurably } from '../../proto/shared/durable-file.js';
import type { ChangeBitmap } from './change-bitmap.js';
import type { ClosedGeneration, Tracker, Validity } from './tracker.js';
import { TrackerState } from './tracker-state.js';

/**
 * Changed-block tracking of one volume, tied to the images it describes.
 *
 * Invariant: the tracker's OPEN generation holds every chunk changed since
 * the snapshot of the image named `basisImageId` (DESIGN.md §7.2). It holds
 * because (1) a successful job's snapshot opens the next generation and the
 * job's image becomes the basis; (2) a failed job's closed generation is
 * absorbed back into the open one; (3) anything the tracker cannot vouch for
 * makes the generation invalid, and an invalid bitmap is never used.
 *
 * The record `STATE/volumes/<volume>.tracking.json` keeps the generation the
 * agent expects to find open at its next start (a saved bitmap of another
 * generation is a gap) and the basis image id; the bitmap itself is
 * `STATE/volumes/<volume>.cbt` (bitmap-file.ts).
 */
/** What tracking needs of a volume (a snapshot VolumeSpec is one): tracking knows no snapshot provider. */
export interface TrackedVolume {
  name: string;
  /** The block device the tracker traces. */
  device: string;
  chunkSize: number;
}

interface TrackingRecord {
  format: 'blocksnap-tracking';
  version: 1;
  generation: number;
  basisImageId: string | null;
}

export interface SwitchResult {
  closed: ClosedGeneration;
  /** The image the closed generation's bits are relative to. */
  basisImageId: string | null;
}

export class VolumeTracking {
  private constructor(
    private readonly volume: TrackedVolume,
    private readonly recordFile: string,
    private record: TrackingRecord,
    private readonly state: TrackerState,
    private readonly log: Logger,
  ) {}

  static async open(volume: TrackedVolume, stateDir: string, tracker: Tracker, log: Logger): Promise<VolumeTracking> {
    const dir = join(stateDir, 'volumes');
    await mkdir(dir, { recursive: true });
    const recordFile = join(dir, `${volume.name}.tracking.json`);
    const record = await readRecord(recordFile);
    const state = await TrackerState.open({
      file: join(dir, `${volume.name}.cbt`), tracker, device: volume.device, chunkSize: volume.chunkSize,
      expectedGeneration: record.generation, saveIntervalMs: 30_000, log,
    });
    const t = new VolumeTracking(volume, recordFile, record, state, log.child({ volume: volume.name }));
    if (!state.resume.valid) t.log.warn({ reason: state.resume.reason }, 'change tracking starts invalid: the next incremental compares digests');
    return t;
  }

  get tracker(): Tracker {
    return this.state.tracker;
  }

  get basisImageId(): string | null {
    return this.record.basisImageId;
  }

  validity(): Validity {
    return this.state.tracker.validity();
  }

  /** Before the freeze. */
  prepare(): Promise<void> {
    return this.state.tracker.prepareSwitch();
  }

  /** After the snapshot exists: closes the generation the job will use. */
  async complete(): Promise<SwitchResult> {
    const closed = await this.state.tracker.completeSwitch();
    const basisImageId = this.record.basisImageId;
    await this.writeRecord({ ...this.record, generation: this.state.tracker.generation });
    await this.state.save();
    return { closed, basisImageId };
  }

  /** The snapshot failed: nothing was closed. */
  abort(): Promise<void> {
    return this.state.tracker.abortSwitch();
  }

  /** The job's image is committed: the open generation is now relative to it. */
  async committed(imageId: string): Promise<void> {
    await this.writeRecord({ ...this.record, basisImageId: imageId });
  }

  /** The job failed after the switch: its changes go back into the open generation. */
  async failed(s: SwitchResult): Promise<void> {
    this.state.tracker.absorb(s.closed);
    await this.state.save();
  }

  async close(): Promise<void> {
    await this.state.close();
  }

  private async writeRecord(r: TrackingRecord): Promise<void> {
    await writeFileDurably(this.recordFile, Buffer.from(JSON.stringify(r) + '\n'));
    this.record = r;
  }
}

/** The selection a valid closed generation gives the reader (same bit layout). */
export function selectionOf(bitmap: ChangeBitmap): Uint32Array {
  return bitmap.words;
}

async function readRecord(file: string): Promise<TrackingRecord> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { format: 'blocksnap-tracking', version: 1, generation: 1, basisImageId: null };
    throw new BlocksnapError('E_TRACKER', `cannot read ${file}`, { cause: e });
  }
  try {
    const r = JSON.parse(text);
    if (r.format !== 'blocksnap-tracking' || r.version !== 1 || !Number.isSafeInteger(r.generation) || r.generation < 1) throw new Error('bad fields');
    return { format: r.format, version: 1, generation: r.generation, basisImageId: typeof r.basisImageId === 'string' ? r.basisImageId : null };
  } catch (e) {
    // A damaged record only costs a digest comparison: start a new generation line, with no basis.
    return { format: 'blocksnap-tracking', version: 1, generation: 1, basisImageId: null };
  }
}
