import { BlocksnapError } from '../../../proto/errors.js';
import { GenerationTracker } from '../generation-tracker.js';
import { Generations } from '../generations.js';
import type { DeviceIdentity, IoCounters, TrackerCheckpoint, TrackerStartOptions } from '../tracker.js';

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
export class MemoryTracker extends GenerationTracker {
  readonly kind = 'memory';
  private device: FakeBlockDevice | null = null;
  private unlisten: (() => void) | null = null;
  private chunkSize = 0;

  constructor(private readonly devices: Iterable<FakeBlockDevice>) {
    super();
  }

  protected async begin(opts: TrackerStartOptions): Promise<void> {
    const dev = [...this.devices].find((d) => d.path === opts.device);
    if (!dev) throw new BlocksnapError('E_TRACKER', `no such device ${opts.device}`);
    this.gens = new Generations({ ...dev.identity }, opts.chunkSize, opts);
    this.device = dev;
    this.chunkSize = opts.chunkSize;
    this.unlisten = dev.listen((offset, length) => this.gens?.recordBytes(offset, length));
    this.info = { identity: { ...dev.identity }, counters: { ...dev.counters } };
  }

  /** Simulates lost kernel events. */
  loseEvents(count: number): void {
    this.live().invalidate(`kernel trace buffer lost ${count} events`);
  }

  protected async takeCheckpoint(): Promise<TrackerCheckpoint> {
    const gens = this.gens!;
    const dev = this.device!;
    if (dev.identity.size !== gens.deviceSize) {
      gens.invalidate(`device size changed from ${gens.deviceSize} to ${dev.identity.size} while tracking`);
    }
    return { ...gens.snapshot(), identity: { ...dev.identity }, counters: { ...dev.counters }, chunkSize: this.chunkSize };
  }

  protected override async release(): Promise<void> {
    this.unlisten?.();
  }
}
