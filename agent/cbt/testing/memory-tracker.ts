import { BlocksnapError } from '../../../proto/errors.js';
import { Generations } from '../generations.js';
import type {
  ClosedGeneration,
  DeviceIdentity,
  IoCounters,
  StartInfo,
  Tracker,
  TrackerCheckpoint,
  TrackerPhase,
  TrackerStartOptions,
  Validity,
} from '../tracker.js';

/**
 * A pretend block device for unit tests of job logic: it has an identity and
 * I/O counters like a real one, and notifies attached trackers of writes.
 * A write made while no tracker is attached still moves the counters, which
 * is exactly what lets TrackerState notice "written while untracked".
 */
export class FakeBlockDevice {
  identity: DeviceIdentity;
  counters: IoCounters;
  private readonly listeners = new Set<(offset: number, length: number) => void>();

  constructor(
    readonly path: string,
    size: number,
    ids: { major?: number; minor?: number; diskseq?: number } = {},
  ) {
    this.identity = { major: ids.major ?? 7, minor: ids.minor ?? 99, size, diskseq: ids.diskseq ?? 1 };
    this.counters = { writeIos: 0, writeSectors: 0, discardIos: 0, discardSectors: 0, writesInFlight: 0, available: true };
  }

  write(offset: number, length: number): void {
    this.counters.writeIos++;
    this.counters.writeSectors += Math.ceil(length / 512);
    for (const l of this.listeners) l(offset, length);
  }

  discard(offset: number, length: number): void {
    this.counters.discardIos++;
    this.counters.discardSectors += Math.ceil(length / 512);
    for (const l of this.listeners) l(offset, length);
  }

  /** Detach + re-attach: a new disk sequence number, counters from zero. */
  reattach(size = this.identity.size): void {
    this.identity = { ...this.identity, size, diskseq: this.identity.diskseq + 1 };
    this.counters = { writeIos: 0, writeSectors: 0, discardIos: 0, discardSectors: 0, writesInFlight: 0, available: true };
  }

  /** @internal */
  listen(fn: (offset: number, length: number) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }
}

/** Tracker over FakeBlockDevices, for tests of the code that uses a Tracker. */
export class MemoryTracker implements Tracker {
  readonly kind = 'memory';
  private gens: Generations | null = null;
  private device: FakeBlockDevice | null = null;
  private unlisten: (() => void) | null = null;
  private info: StartInfo | null = null;
  private final: TrackerCheckpoint | null = null;
  private chunkSize = 0;
  private _phase: TrackerPhase = 'new';

  constructor(private readonly devices: Iterable<FakeBlockDevice>) {}

  get phase(): TrackerPhase {
    return this._phase;
  }

  get generation(): number {
    return this.live().generation;
  }

  get startInfo(): StartInfo {
    if (!this.info) throw new BlocksnapError('E_TRACKER', 'tracker not started');
    return this.info;
  }

  async start(opts: TrackerStartOptions): Promise<void> {
    if (this._phase !== 'new') throw new BlocksnapError('E_TRACKER', `cannot start a tracker that is ${this._phase}`);
    const dev = [...this.devices].find((d) => d.path === opts.device);
    if (!dev) throw new BlocksnapError('E_TRACKER', `no such device ${opts.device}`);
    this.gens = new Generations({ ...dev.identity }, opts.chunkSize, opts);
    this.device = dev;
    this.chunkSize = opts.chunkSize;
    this.unlisten = dev.listen((offset, length) => this.gens?.recordBytes(offset, length));
    this.info = { identity: { ...dev.identity }, counters: { ...dev.counters } };
    this._phase = 'tracking';
  }

  /** Simulates lost kernel events. */
  loseEvents(count: number): void {
    this.live().invalidate(`kernel trace buffer lost ${count} events`);
  }

  async prepareSwitch(): Promise<void> {
    this.live().beginSwitch();
    this._phase = 'switching';
  }

  async completeSwitch(): Promise<ClosedGeneration> {
    const closed = this.live().finishSwitch();
    this._phase = 'tracking';
    return closed;
  }

  absorb(closed: ClosedGeneration): void {
    this.live().absorb(closed);
  }

  async abortSwitch(): Promise<void> {
    this.live().abortSwitch();
    this._phase = 'tracking';
  }

  validity(): Validity {
    return this.live().validity();
  }

  invalidate(reason: string): void {
    this.live().invalidate(reason);
  }

  async checkpoint(): Promise<TrackerCheckpoint> {
    const gens = this.live();
    const dev = this.device!;
    if (dev.identity.size !== gens.deviceSize) {
      gens.invalidate(`device size changed from ${gens.deviceSize} to ${dev.identity.size} while tracking`);
    }
    return { ...gens.snapshot(), identity: { ...dev.identity }, counters: { ...dev.counters }, chunkSize: this.chunkSize };
  }

  async stop(): Promise<TrackerCheckpoint> {
    if (this.final) return this.final;
    const cp = await this.checkpoint();
    this.unlisten?.();
    this.final = cp;
    this._phase = 'stopped';
    return cp;
  }

  private live(): Generations {
    if (this._phase === 'stopped') throw new BlocksnapError('E_TRACKER', 'tracker is stopped');
    if (!this.gens) throw new BlocksnapError('E_TRACKER', 'tracker not started');
    return this.gens;
  }
}
