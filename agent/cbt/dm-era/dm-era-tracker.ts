/**
 * Changed-block tracking with a dm-era target: the filesystem sits on an
 * `era` device (`dmsetup create NAME --table "0 SECTORS era META ORIGIN
 * BLOCKSECTORS"`) over the volume, and the kernel records for every block
 * the era in which it was last written (discards included). A generation is
 * "every block written in an era ≥ its basis era".
 *
 * The switch, against the Tracker contract (tracker.ts), like thin-delta:
 * - prepareSwitch (settle): `take_metadata_snap` (it rolls the era over:
 *   later writes get the new era E'), `era_invalidate --metadata-snapshot
 *   --written-since basis` into G alone, `drop_metadata_snap`;
 * - completeSwitch (drain): the same with --written-since E', into G and
 *   G+1 (writes racing the snapshot land in both); E' becomes the basis.
 * - abortSwitch: the basis stays, so the next cut covers everything since.
 * - checkpoint: --written-since the open generation's era.
 *
 * Invalid (a digest compare then runs, with the reason): the era went
 * backwards (metadata replaced or reformatted), the device's table no longer
 * an era target, a failing metadata snapshot or era_invalidate, a device
 * identity change across a restart (new diskseq), a block beyond the
 * tracked size. Blind spot: writes that reach the device under the era
 * target (the LV itself) are not seen — only the era device may be written.
 */
import { readFile } from 'node:fs/promises';
import { BlocksnapError } from '../../../proto/errors.js';
import type { Logger } from '../../../proto/shared/log.js';
import { lvm } from '../../snapshot/lvm/lvm-cli.js';
import { readBlockDeviceInfo, readIoCounters, type BlockDeviceInfo } from '../device-identity.js';
import { GenerationTracker } from '../generation-tracker.js';
import { Generations } from '../generations.js';
import type { TrackerCheckpoint, TrackerStartOptions } from '../tracker.js';

export interface EraTarget {
  /** dm name of the era device. */
  name: string;
  /** Metadata device (a /dev/mapper path or /dev/block/M:m made by dmsetup mknodes). */
  metadata: string;
  blockBytes: number;
}

/** `<metadata block size> <used>/<total> <current era> <held metadata root | ->` */
export function parseEraStatus(status: string): { era: number; held: boolean } {
  const f = status.trim().split(/\s+/);
  const i = f.indexOf('era');
  const era = Number(f[i + 3]);
  if (i < 0 || !Number.isInteger(era)) throw new BlocksnapError('E_TRACKER', `unparseable era status: ${status}`);
  return { era, held: f[i + 4] !== undefined && f[i + 4] !== '-' };
}

/** Blocks of `era_invalidate` XML: `<block block="N"/>` and `<range begin="B" end = "E"/>` (end exclusive). */
export function parseEraBlocks(xml: string): Array<[number, number]> {
  if (!/<blocks>/.test(xml)) throw new BlocksnapError('E_TRACKER', `era_invalidate printed no <blocks>: ${xml.slice(0, 200)}`);
  const out: Array<[number, number]> = [];
  for (const m of xml.matchAll(/<block\s+block\s*=\s*"(\d+)"\s*\/>/g)) out.push([Number(m[1]), 1]);
  for (const m of xml.matchAll(/<range\s+begin\s*=\s*"(\d+)"\s+end\s*=\s*"(\d+)"\s*\/>/g)) out.push([Number(m[1]), Number(m[2]) - Number(m[1])]);
  return out;
}

/** The era target of block device M:m, or an E_TRACKER error saying why not. */
export async function readEraTarget(major: number, minor: number): Promise<EraTarget> {
  const name = (await readFile(`/sys/dev/block/${major}:${minor}/dm/name`, 'utf8').catch(() => '')).trim();
  if (!name) throw new BlocksnapError('E_TRACKER', `${major}:${minor} is not a device-mapper device: dm-era tracks an era target`);
  const table = (await lvm('dmsetup', ['table', name], { code: 'E_TRACKER' })).trim();
  const f = table.split(/\s+/);
  if (f[2] !== 'era' || f.length < 6) throw new BlocksnapError('E_TRACKER', `${name} is not an era target (table: ${table})`);
  const [mmaj, mmin] = f[3]!.split(':');
  const metaName = (await readFile(`/sys/dev/block/${mmaj}:${mmin}/dm/name`, 'utf8').catch(() => '')).trim();
  await lvm('dmsetup', ['mknodes'], { code: 'E_TRACKER' });
  return { name, metadata: metaName ? `/dev/mapper/${metaName}` : `/dev/block/${f[3]}`, blockBytes: Number(f[5]) * 512 };
}

export class DmEraTracker extends GenerationTracker {
  readonly kind = 'dm-era';
  private dev: BlockDeviceInfo | null = null;
  private chunkSize = 0;
  private target: EraTarget | null = null;
  private basisEra = 0;
  private pendingEra: number | null = null;

  constructor(private readonly opts: { log?: Logger } = {}) {
    super();
  }

  protected async begin(opts: TrackerStartOptions): Promise<void> {
    const dev = await readBlockDeviceInfo(opts.device);
    const target = await readEraTarget(dev.identity.major, dev.identity.minor);
    const { era } = await this.status(target);
    this.dev = dev;
    this.target = target;
    this.chunkSize = opts.chunkSize;
    this.basisEra = era;
    const gens = new Generations(dev.identity, opts.chunkSize, opts, (reason) =>
      this.opts.log?.warn({ device: opts.device, generation: gens.generation, reason }, 'change tracking invalid'));
    this.gens = gens;
    this.info = { identity: dev.identity, counters: await readIoCounters(dev.identity.major, dev.identity.minor) };
    this.opts.log?.info({ device: opts.device, era: target.name, basisEra: era, generation: opts.generation }, 'dm-era tracking started');
  }

  private async status(t: EraTarget): Promise<{ era: number; held: boolean }> {
    return parseEraStatus(await lvm('dmsetup', ['status', t.name], { code: 'E_TRACKER' }));
  }

  /**
   * One metadata snapshot at a time: a second take_metadata_snap fails with
   * EINVAL ("metadata snapshot already exists"). The periodic checkpoint
   * (tracker-state's save) and a job's switch both read the era, and in the
   * lab's bench they overlapped and invalidated the tracker: they queue here.
   */
  private queue: Promise<unknown> = Promise.resolve();

  private recordSince(since: number): Promise<number | null> {
    const run = this.queue.then(() => this.recordSinceNow(since));
    this.queue = run.catch(() => undefined);
    return run;
  }

  /**
   * Takes a metadata snapshot (rolling the era over), records every block
   * written in an era ≥ `since` into the open generation(s), drops the
   * snapshot. Returns the era later writes get, or null if it failed (then
   * the open generations are invalid).
   */
  private async recordSinceNow(since: number): Promise<number | null> {
    const t = this.target!;
    const gens = this.gens!;
    try {
      const before = await this.status(t);
      if (before.era < since) {
        gens.invalidate(`era of ${t.name} went back from ${since} to ${before.era}: its metadata was replaced`);
        return before.era;
      }
      await lvm('dmsetup', ['message', t.name, '0', 'take_metadata_snap'], { code: 'E_TRACKER' });
      let xml: string;
      try {
        xml = await lvm('era_invalidate', ['--metadata-snapshot', '--written-since', String(since), t.metadata], { code: 'E_TRACKER' });
      } finally {
        await lvm('dmsetup', ['message', t.name, '0', 'drop_metadata_snap'], { code: 'E_TRACKER' });
      }
      const size = this.dev!.identity.size;
      for (const [block, count] of parseEraBlocks(xml)) {
        const start = block * t.blockBytes;
        if (start >= size) {
          gens.invalidate(`era_invalidate block ${block} is beyond the tracked size ${size}`);
          continue;
        }
        gens.recordBytes(start, Math.min(count * t.blockBytes, size - start));
      }
      // take_metadata_snap rolled the era over exactly once: later writes get an era ≥ before + 1
      // (more only if someone else rolled it too — then before + 1 is a lower basis: a superset).
      // Saves a `dmsetup status` per read (each command is a ptrace round trip in the lab).
      return before.era + 1;
    } catch (e) {
      gens.invalidate(`dm-era metadata of ${t.name} could not be read: ${(e as Error).message}`);
      return null;
    }
  }

  protected override async settle(): Promise<void> {
    this.pendingEra = await this.recordSince(this.basisEra);
  }

  protected override async drain(): Promise<void> {
    const p = this.pendingEra;
    this.pendingEra = null;
    if (p === null) return;
    await this.recordSince(p);
    this.basisEra = p;
  }

  override async abortSwitch(): Promise<void> {
    await super.abortSwitch();
    this.pendingEra = null;
  }

  protected async takeCheckpoint(): Promise<TrackerCheckpoint> {
    const dev = this.dev!;
    const counters = await readIoCounters(dev.identity.major, dev.identity.minor);
    await this.recordSince(this.pendingEra ?? this.basisEra);
    return { ...this.gens!.snapshot(), identity: dev.identity, counters, chunkSize: this.chunkSize };
  }
}

/** Drops a metadata snapshot a killed run left held on any era target; returns what it released. */
export async function cleanupStaleDmEra(): Promise<string[]> {
  const out = await lvm('dmsetup', ['status', '--target', 'era'], { code: 'E_TRACKER' }).catch(() => '');
  const released: string[] = [];
  for (const line of out.split('\n')) {
    const m = /^(\S+):\s+(.*)$/.exec(line.trim());
    if (!m || !m[2]!.includes(' era ')) continue;
    if (parseEraStatus(m[2]!).held) {
      await lvm('dmsetup', ['message', m[1]!, '0', 'drop_metadata_snap'], { code: 'E_TRACKER' });
      released.push(`era metadata snapshot of ${m[1]}`);
    }
  }
  return released;
}
