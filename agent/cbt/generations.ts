import { BlocksnapError } from '../../proto/errors.js';
import { ChangeBitmap } from './change-bitmap.js';
import { VALID, invalid, type ClosedGeneration, type DeviceIdentity, type TrackerStartOptions, type Validity } from './tracker.js';

interface Generation {
  number: number;
  bitmap: ChangeBitmap;
  validity: Validity;
}

/**
 * The generation bookkeeping every Tracker shares, so the in-memory fake and
 * the kernel tracker obey exactly the same switching rules.
 *
 * `open` is generation G. Between beginSwitch() and finishSwitch() there is
 * also `next` (G+1) and every recorded range goes into both: that overlap
 * is what turns a write racing the snapshot into a superset instead of a gap.
 */
export class Generations {
  private open: Generation;
  private next: Generation | null = null;
  private readonly onInvalid: (reason: string) => void;

  readonly deviceSize: number;

  constructor(
    identity: DeviceIdentity,
    readonly chunkSize: number,
    opts: Pick<TrackerStartOptions, 'generation' | 'initial' | 'invalidReason'>,
    onInvalid: (reason: string) => void = () => {},
  ) {
    this.onInvalid = onInvalid;
    this.deviceSize = identity.size;
    let bitmap = new ChangeBitmap(identity.size, chunkSize);
    let validity: Validity = invalid('tracking started without a saved bitmap: writes before start are unknown');
    if (opts.initial) {
      const mismatch = identityMismatch(opts.initial.identity, identity);
      if (mismatch !== null) {
        validity = invalid(mismatch);
      } else if (opts.initial.bitmap.chunkSize !== chunkSize || opts.initial.bitmap.deviceSize !== identity.size) {
        validity = invalid(`chunk size changed: saved ${opts.initial.bitmap.chunkSize}, now ${chunkSize}`);
      } else {
        bitmap = opts.initial.bitmap.clone();
        validity = VALID;
      }
    }
    if (opts.invalidReason !== undefined) validity = invalid(opts.invalidReason);
    this.open = { number: opts.generation, bitmap, validity };
  }

  get generation(): number {
    return this.open.number;
  }

  get switching(): boolean {
    return this.next !== null;
  }

  validity(): Validity {
    return this.open.validity;
  }

  /** Hot path: one traced write, in 512-byte sectors relative to the device. */
  recordSectors(sector: number, count: number): void {
    const inRange = this.open.bitmap.setSectors(sector, count);
    if (this.next !== null) this.next.bitmap.setSectors(sector, count);
    if (!inRange) this.invalidate(`write at sector ${sector} + ${count} is beyond the tracked size ${this.deviceSize}`);
  }

  recordBytes(offset: number, length: number): void {
    const inRange = this.open.bitmap.setBytes(offset, length);
    if (this.next !== null) this.next.bitmap.setBytes(offset, length);
    if (!inRange) this.invalidate(`write at byte ${offset} + ${length} is beyond the tracked size ${this.deviceSize}`);
  }

  /** Invalidates every generation open now (G, and G+1 while switching). */
  invalidate(reason: string): void {
    let changed = false;
    for (const g of [this.open, this.next]) {
      if (g && g.validity.valid) {
        g.validity = invalid(reason);
        changed = true;
      }
    }
    if (changed) this.onInvalid(reason);
  }

  beginSwitch(): void {
    if (this.next) throw new BlocksnapError('E_TRACKER', 'prepareSwitch called twice without completeSwitch');
    this.next = {
      number: this.open.number + 1,
      bitmap: new ChangeBitmap(this.deviceSize, this.chunkSize),
      validity: VALID,
    };
  }

  finishSwitch(): ClosedGeneration {
    if (!this.next) throw new BlocksnapError('E_TRACKER', 'completeSwitch called without prepareSwitch');
    const closed = this.open;
    this.open = this.next;
    this.next = null;
    return { generation: closed.number, bitmap: closed.bitmap, validity: closed.validity };
  }

  abortSwitch(): void {
    if (!this.next) throw new BlocksnapError('E_TRACKER', 'abortSwitch called without prepareSwitch');
    this.next = null;
  }

  /**
   * Folds a closed generation whose image was never committed back into the
   * open one, so the open generation again covers every change since the
   * last committed image's snapshot. An invalid closed generation makes the
   * open one invalid too: its bits cannot be vouched for.
   */
  absorb(closed: ClosedGeneration): void {
    if (this.next) throw new BlocksnapError('E_TRACKER', 'absorb during a switch');
    if (closed.generation >= this.open.number) {
      throw new BlocksnapError('E_TRACKER', `absorb of generation ${closed.generation} into older generation ${this.open.number}`);
    }
    this.open.bitmap.unionWith(closed.bitmap);
    if (!closed.validity.valid) this.invalidate(`generation ${closed.generation}, not committed, was invalid: ${closed.validity.reason}`);
  }

  /** A copy of the open generation. */
  snapshot(): ClosedGeneration {
    return { generation: this.open.number, bitmap: this.open.bitmap.clone(), validity: this.open.validity };
  }
}

/** Why a bitmap saved for `saved` cannot describe `now`, or null if it can. */
export function identityMismatch(saved: DeviceIdentity, now: DeviceIdentity): string | null {
  if (saved.major !== now.major || saved.minor !== now.minor || saved.diskseq !== now.diskseq) {
    return (
      `device identity changed: saved ${saved.major}:${saved.minor} diskseq ${saved.diskseq}, ` +
      `now ${now.major}:${now.minor} diskseq ${now.diskseq}`
    );
  }
  if (saved.size !== now.size) return `device size changed: saved ${saved.size} bytes, now ${now.size} bytes`;
  return null;
}
