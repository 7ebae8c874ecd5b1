import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { BlocksnapError, toBlocksnapError } from '../../../proto/errors.js';
import type { Logger } from '../../../proto/shared/log.js';
import { kernelDev, readBlockDeviceInfo, readIoCounters, type BlockDeviceInfo } from '../device-identity.js';
import { Generations, identityMismatch } from '../generations.js';
import { TracePipeReader } from './trace-pipe-reader.js';
import { bioSink } from './bio-sink.js';
import { TraceLineParser } from './trace-line-parser.js';
import {
  configureInstance,
  formatInstanceName,
  readLossCounters,
  removeInstance,
  setEventEnabled,
  tracefsRoot,
  type LossCounters,
} from './tracefs-instance.js';
import { processStartTime } from '../../../proto/shared/proc.js';
import { GenerationTracker } from '../generation-tracker.js';
import type { TrackerCheckpoint, TrackerStartOptions } from '../tracker.js';

/*
 * Kernel write tracker on tracefs: one private tracing instance per device,
 * the block_bio_queue event filtered on `dev == N && !(rwbs ~ "R*")`.
 *
 * Why block_bio_queue alone. It fires once for every bio entering the block
 * layer through submit_bio_noacct() (BIO_TRACE_COMPLETION stops a second
 * record for remapped/split bios), with sectors already remapped to the whole
 * disk. Every content change of a loop or device-mapper volume arrives as a
 * bio: filesystem writeback, O_DIRECT, discards (D), write-zeroes (N),
 * blkdev page-cache writeback. The request-level events (block_rq_insert /
 * block_rq_issue) would only add passthrough requests (SG_IO, NVMe
 * passthrough ioctls), which loop and dm devices do not execute themselves
 * (dm forwards such ioctls to the underlying disk), at the price of
 * recording every write twice. Known blind spots, outside the contract:
 * writes that bypass the volume's block device (to a loop device's backing
 * file, or to the disk under an LV) and passthrough commands to the traced
 * device itself. The filter keeps every op that is not a read, so an op we
 * do not know still counts; a zero-sector record is a flush and is skipped,
 * except a zero-sector N (zone reset/finish) which would change content we
 * cannot locate: it invalidates.
 *
 * Why a generation switch never leaves a gap (S = the snapshot's instant).
 * F1  block_bio_queue fires synchronously while the bio is submitted, before
 *     the driver sees it: a write cannot complete before its record is
 *     committed to the ring buffer.
 * F2  trace_pipe merges all CPUs' records in timestamp order, and the
 *     instance uses the "mono" clock, monotonic across CPUs. A record
 *     committed before the barrier marker is written has a smaller timestamp
 *     than the marker and is read before it. A record overwritten or dropped
 *     instead shows in per_cpu stats or as [LOST N EVENTS]: invalid.
 * F3  One thread applies records in stream order to the generations open at
 *     that moment; prepareSwitch() drains, then opens G+1 synchronously on
 *     that thread, so every record read after that goes into G and G+1.
 * A1  (the snapshot mechanism's duty) A write queued before prepareSwitch()
 *     resolved has completed before S. fsfreeze (called after
 *     prepareSwitch resolves) guarantees it for every write issued through
 *     the filesystem: freeze_super() waits for writers in progress and syncs;
 *     a dm suspend guarantees it for every bio.
 * Claim for G: a chunk that differs between S(G-1) and S(G) was changed by a
 * write W present in S(G) and absent from S(G-1). Present in S(G): W
 * completed before S(G) (F1: its record was committed before S(G) <
 * completeSwitch's marker), so it is read before the marker (F2) and
 * applied before G closes. Absent from S(G-1): by A1 W was queued after
 * prepareSwitch(G-1) resolved, so it was applied after G opened (F3). So
 * W's chunks are in G. A write racing S(G) -- queued after prepareSwitch(G),
 * completed anywhere around S(G) -- is applied while both G and G+1 are
 * open, lands in both: a superset, never a gap. abortSwitch() drops G+1
 * and keeps G open with everything, so a failed snapshot loses nothing.
 */

export interface TracefsTrackerOptions {
  /** tracefs mount point; found in /proc/mounts (mounted if absent) by default. */
  root?: string;
  /** Per-CPU ring buffer of the instance, KiB. */
  bufferSizeKb?: number;
  /** How often lost-event counters are polled between barriers. */
  statsIntervalMs?: number;
  /** A drain barrier not back after this long makes the bitmap invalid. */
  barrierTimeoutMs?: number;
  log?: Logger;
}

let instanceSeq = 0;

export class TracefsTracker extends GenerationTracker {
  readonly kind = 'tracefs';
  private dev: BlockDeviceInfo | null = null;
  private device = '';
  private reader: TracePipeReader | null = null;
  private dir = '';
  private name = '';
  private root = '';
  private chunkSize = 0;
  private lossBase: LossCounters | null = null;
  private timer: NodeJS.Timeout | null = null;
  private lossCheck: Promise<void> = Promise.resolve();
  private readonly waiters = new Map<string, () => void>();
  private barrierSeq = 0;
  private readerDead = false;
  private readonly opts: Required<Omit<TracefsTrackerOptions, 'root' | 'log'>> & TracefsTrackerOptions;

  constructor(opts: TracefsTrackerOptions = {}) {
    super();
    this.opts = {
      ...opts,
      bufferSizeKb: opts.bufferSizeKb ?? 4096,
      statsIntervalMs: opts.statsIntervalMs ?? 1000,
      barrierTimeoutMs: opts.barrierTimeoutMs ?? 30_000,
    };
  }

  /** The tracing instance's name (for logs and tests). */
  get instanceName(): string {
    return this.name;
  }

  protected async begin(opts: TrackerStartOptions): Promise<void> {
    const dev = await readBlockDeviceInfo(opts.device);
    const gens = new Generations(dev.identity, opts.chunkSize, opts, (reason) =>
      this.opts.log?.warn({ device: opts.device, generation: gens.generation, reason }, 'change tracking invalid'),
    );
    this.device = opts.device;
    this.dev = dev;
    this.gens = gens;
    this.chunkSize = opts.chunkSize;
    this.root = this.opts.root ?? (await tracefsRoot());
    const startTime = await processStartTime(process.pid);
    this.name = formatInstanceName({
      pid: process.pid,
      startTime: Number(startTime ?? 0),
      major: dev.identity.major,
      minor: dev.identity.minor,
      seq: ++instanceSeq,
    });
    this.dir = path.join(this.root, 'instances', this.name);
    try {
      await fsp.mkdir(this.dir);
    } catch (e) {
      throw new BlocksnapError('E_TRACKER', `cannot create tracing instance ${this.dir}`, { cause: e });
    }
    try {
      await this.configure(dev);
      this.lossBase = await readLossCounters(this.dir);
      this.info = { identity: dev.identity, counters: await readIoCounters(dev.identity.major, dev.identity.minor) };
    } catch (e) {
      await this.release().catch(() => {});
      throw toBlocksnapError(e, 'E_TRACKER');
    }
    this.timer = setInterval(() => void this.checkLosses().catch(() => {}), this.opts.statsIntervalMs);
    this.timer.unref();
    this.opts.log?.info({ device: opts.device, instance: this.name, generation: opts.generation }, 'tracking started');
  }

  /**
   * Drain first: records of writes completed before prepareSwitch are applied
   * to G alone, so G+1 does not start with their extra bits (fewer chunks
   * read by the next incremental). A failed barrier only costs that
   * precision: the records then land in both generations.
   */
  protected override async settle(): Promise<void> {
    if (!this.readerDead) await this.barrier().catch(() => undefined);
  }

  protected async takeCheckpoint(): Promise<TrackerCheckpoint> {
    const gens = this.gens!;
    const dev = this.dev!;
    // Counters first: every write they count was queued earlier, so the drain
    // below brings it into the bitmap.
    const counters = await readIoCounters(dev.identity.major, dev.identity.minor);
    await this.drain();
    return { ...gens.snapshot(), identity: dev.identity, counters, chunkSize: this.chunkSize };
  }

  protected override stopped(cp: TrackerCheckpoint): void {
    this.opts.log?.info({ instance: this.name, generation: cp.generation, validity: cp.validity }, 'tracking stopped');
  }

  /** Barrier + loss and device checks: after it, every write queued before the call is applied. */
  protected override async drain(): Promise<void> {
    const gens = this.gens!;
    if (!this.readerDead) {
      try {
        await this.barrier();
      } catch (e) {
        gens.invalidate(`drain barrier failed: ${(e as Error).message}`);
      }
    }
    await this.checkLosses();
    await this.checkDevice();
  }

  /** A resize or a re-attach under us means the bitmap describes another device. */
  private async checkDevice(): Promise<void> {
    const why = await readBlockDeviceInfo(this.device).then(
      (now) => identityMismatch(this.dev!.identity, now.identity),
      (e: Error) => `device ${this.device} is gone: ${e.message}`,
    );
    if (why !== null) this.gens!.invalidate(`while tracking ${this.device}: ${why}`);
  }

  private async barrier(): Promise<void> {
    const reader = this.reader!;
    const token = `blocksnap-barrier ${this.name} ${++this.barrierSeq}`;
    let timer: NodeJS.Timeout | undefined;
    const back = new Promise<void>((resolve, reject) => {
      this.waiters.set(token, resolve);
      timer = setTimeout(
        () => reject(new BlocksnapError('E_TIMEOUT', `marker not back after ${this.opts.barrierTimeoutMs} ms`)),
        this.opts.barrierTimeoutMs,
      );
    });
    reader.hold();
    try {
      reader.mark(`${token}\n`);
      await back;
    } finally {
      clearTimeout(timer);
      this.waiters.delete(token);
      reader.release();
    }
  }

  /** Serialised: the timer and a drain must not both move the baseline. */
  private checkLosses(): Promise<void> {
    const run = this.lossCheck.then(() => this.compareLosses());
    this.lossCheck = run.catch(() => {});
    return run;
  }

  private async compareLosses(): Promise<void> {
    if (!this.lossBase || !this.gens) return;
    const now = await readLossCounters(this.dir);
    const base = this.lossBase;
    this.lossBase = now;
    if (now.overrun > base.overrun || now.commitOverrun > base.commitOverrun || now.dropped > base.dropped) {
      this.gens.invalidate(
        `kernel trace buffer lost events: overrun +${now.overrun - base.overrun}, ` +
          `commit overrun +${now.commitOverrun - base.commitOverrun}, dropped +${now.dropped - base.dropped}`,
      );
    }
  }

  private async configure(dev: BlockDeviceInfo): Promise<void> {
    await configureInstance(this.dir, {
      bufferSizeKb: this.opts.bufferSizeKb,
      filter: `dev == ${kernelDev(dev.traceMajor, dev.traceMinor)} && !(rwbs ~ "R*")`,
    });
    const parser = new TraceLineParser(bioSink(dev, this.gens!, (text) => this.waiters.get(text)?.()));
    this.reader = await TracePipeReader.open(this.dir, {
      data: (bytes) => parser.push(bytes),
      failed: (message) => {
        this.readerDead = true;
        this.gens?.invalidate(`trace_pipe reader failed: ${message}`);
      },
    });
    await setEventEnabled(this.dir, true);
  }

  /** Disables the event, stops the reader, removes the instance. Collects every failure. */
  protected override async release(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    const errors: unknown[] = [];
    await setEventEnabled(this.dir, false).catch((e) => errors.push(e));
    if (this.reader) await this.reader.close().catch((e) => errors.push(e));
    this.reader = null;
    await removeInstance(this.root, this.name).catch((e) => errors.push(e));
    if (errors.length > 0) throw toBlocksnapError(errors[0], 'E_TRACKER');
  }
}
