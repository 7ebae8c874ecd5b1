/**
 * Changed-block tracking of a thin LV from the pool's own metadata: a thin
 * snapshot kept as the *basis*, and `thin_delta` between the basis and the
 * live origin (both are thin devices of one pool; a block written since the
 * basis no longer shares its mapping). No kernel events, so nothing can be
 * lost while the agent is down: the basis survives restarts.
 *
 * The switch, against the Tracker contract (tracker.ts):
 * - prepareSwitch (settle): take a new thin snapshot P of the origin, then
 *   record delta(basis, P) into G alone;
 * - completeSwitch (drain): record delta(P, origin now) into G and G+1
 *   (the writes racing the snapshot: a superset, never a gap); P becomes the
 *   basis and the old basis is removed. The previous basis is kept only as
 *   long as it is the basis.
 * - abortSwitch: P is removed; the basis stays, G keeps what it recorded.
 * - checkpoint: delta(basis, origin now) into the open generation.
 * Each thin_delta runs on the pool's metadata snapshot: reserve_metadata_snap
 * (which commits the pool's transaction first), thin_delta -m, and
 * release_metadata_snap in a finally.
 *
 * What makes a generation invalid (a digest compare then runs, with the
 * reason): the basis snapshot removed or replaced outside blocksnap, a
 * thin_delta or metadata-snapshot failure (pool metadata damaged or in
 * use), a device identity change across a restart (reactivation, reboot:
 * a new diskseq), a delta range beyond the tracked size.
 */
import { BlocksnapError, toBlocksnapError } from '../../../proto/errors.js';
import type { Logger } from '../../../proto/shared/log.js';
import { listLvs, lvm, type LvInfo } from '../../snapshot/lvm/lvm-cli.js';
import { readBlockDeviceInfo, readIoCounters, type BlockDeviceInfo } from '../device-identity.js';
import { GenerationTracker } from '../generation-tracker.js';
import { Generations } from '../generations.js';
import type { TrackerCheckpoint, TrackerStartOptions } from '../tracker.js';
import { parseThinDelta } from './thin-delta-parse.js';

export const BASIS_TAG = 'bsn.basis';
const originTag = (lv: LvInfo) => `bsn.origin.${lv.vg}.${lv.name}`;

/** dm name of an LV (dashes doubled). */
export function dmName(vg: string, lv: string): string {
  return `${vg.replace(/-/g, '--')}-${lv.replace(/-/g, '--')}`;
}

export interface ThinDeltaTrackerOptions {
  log?: Logger;
}

let seq = 0;

/**
 * A pool holds one metadata snapshot at a time: a second reserve_metadata_snap
 * fails with EBUSY. Seen in the lab's e2e (a checkpoint's thin_delta racing a
 * switch's), and trackers of several LVs of one pool would race the same way:
 * every reserve … release of a pool runs after the previous one in this process.
 */
const poolQueues = new Map<string, Promise<void>>();
function onePerPool<T>(tpool: string, fn: () => Promise<T>): Promise<T> {
  const run = (poolQueues.get(tpool) ?? Promise.resolve()).then(fn);
  const tail = run.then(() => undefined, () => undefined);
  poolQueues.set(tpool, tail);
  void tail.then(() => poolQueues.get(tpool) === tail && poolQueues.delete(tpool));
  return run;
}

export class ThinDeltaTracker extends GenerationTracker {
  readonly kind = 'thin-delta';
  private dev: BlockDeviceInfo | null = null;
  private chunkSize = 0;
  private origin: LvInfo | null = null;
  private basis: LvInfo | null = null;
  private pending: LvInfo | null = null;

  constructor(private readonly opts: ThinDeltaTrackerOptions = {}) {
    super();
  }

  protected async begin(opts: TrackerStartOptions): Promise<void> {
    const dev = await readBlockDeviceInfo(opts.device);
    const { major, minor } = dev.identity;
    const all = await listLvs([], { code: 'E_TRACKER' });
    const origin = all.find((l) => l.major === major && l.minor === minor);
    if (!origin) throw new BlocksnapError('E_TRACKER', `${opts.device} (${major}:${minor}) is not an active LV: thin-delta tracks thin LVs`);
    if (origin.segtype !== 'thin') throw new BlocksnapError('E_TRACKER', `LV ${origin.vg}/${origin.name} is ${origin.segtype}, not thin: thin-delta tracks thin LVs`);
    this.dev = dev;
    this.chunkSize = opts.chunkSize;
    this.origin = origin;
    const gens = new Generations(dev.identity, opts.chunkSize, opts, (reason) =>
      this.opts.log?.warn({ device: opts.device, generation: gens.generation, reason }, 'change tracking invalid'));
    this.gens = gens;
    // The newest basis of this origin (an earlier run's) goes on; older ones are removed.
    const bases = all.filter((l) => l.tags.includes(originTag(origin)) && l.tags.includes(BASIS_TAG) && l.origin === origin.name)
      .sort((a, b) => a.name.localeCompare(b.name));
    this.basis = bases.pop() ?? null;
    for (const old of bases) await lvm('lvremove', ['-q', '-f', `${old.vg}/${old.name}`], { code: 'E_TRACKER' });
    if (!this.basis) {
      this.basis = (await this.snapshotOrigin()).lv;
      if (opts.initial) gens.invalidate(`no basis snapshot of ${origin.vg}/${origin.name} was left by the earlier run: changes since its stop are unknown`);
    }
    this.info = { identity: dev.identity, counters: await readIoCounters(major, minor) };
    this.opts.log?.info({ device: opts.device, basis: this.basis.name, generation: opts.generation }, 'thin-delta tracking started');
  }

  /**
   * A thin snapshot of the origin, tagged as a basis (never activated:
   * thin_delta reads the pool's metadata). Also returns the origin's bases
   * as they are now (one `lvs` by tag for both: each LVM command costs
   * about a second in the lab's guest).
   */
  private async snapshotOrigin(): Promise<{ lv: LvInfo; bases: LvInfo[] }> {
    const o = this.origin!;
    const name = `bsn.basis.${o.name}.${Date.now().toString(36)}${(++seq).toString(36)}`.slice(0, 120);
    await lvm('lvcreate', ['-q', '-s', '-n', name, '--addtag', 'blocksnap', '--addtag', BASIS_TAG, '--addtag', originTag(o), `${o.vg}/${o.name}`], { code: 'E_TRACKER' });
    const bases = await listLvs([`@${originTag(o)}`], { code: 'E_TRACKER' });
    const lv = bases.find((l) => l.vg === o.vg && l.name === name);
    if (!lv || !(lv.thinId >= 0)) throw new BlocksnapError('E_TRACKER', `basis snapshot ${o.vg}/${name} has no thin id`);
    return { lv, bases };
  }

  /**
   * Ranges changed between thin devices `from` and `to` (the origin when
   * omitted), recorded into the open generation(s). `from` is first checked
   * to be still the snapshot it was (not removed or replaced outside
   * blocksnap) — against `listed` when the caller has just listed it, or
   * not at all when `from` was made by this very switch (`'fresh'`: if it
   * is gone, thin_delta fails and the generation is invalid anyway).
   */
  private async recordDelta(from: LvInfo, to?: LvInfo, listed?: LvInfo[] | 'fresh'): Promise<void> {
    const o = this.origin!;
    const gens = this.gens!;
    if (listed !== 'fresh') {
      const current = listed
        ? listed.find((l) => l.vg === o.vg && l.name === from.name)
        : (await listLvs([`${o.vg}/${from.name}`], { code: 'E_TRACKER' }).catch(() => []))[0];
      if (!current || current.thinId !== from.thinId || current.origin !== o.name) {
        gens.invalidate(`basis snapshot ${o.vg}/${from.name} is gone or was replaced outside blocksnap: changes since it are unknown`);
        return;
      }
    }
    const tpool = `${dmName(o.vg, o.pool)}-tpool`;
    const tmeta = `/dev/mapper/${dmName(o.vg, `${o.pool}_tmeta`)}`;
    try {
      await lvm('dmsetup', ['mknodes'], { code: 'E_TRACKER' });
      const xml = await onePerPool(tpool, async () => {
        await this.reserve(tpool);
        try {
          return await lvm('thin_delta', ['-m', '--snap1', String(from.thinId), '--snap2', String((to ?? o).thinId), tmeta], { code: 'E_TRACKER' });
        } finally {
          await lvm('dmsetup', ['message', tpool, '0', 'release_metadata_snap'], { code: 'E_TRACKER' });
        }
      });
      const delta = parseThinDelta(xml);
      const size = this.dev!.identity.size;
      for (const [begin, length] of delta.changed) {
        const start = begin * delta.blockBytes;
        if (start >= size) {
          gens.invalidate(`thin_delta range at block ${begin} is beyond the tracked size ${size}`);
          continue;
        }
        gens.recordBytes(start, Math.min(length * delta.blockBytes, size - start));
      }
    } catch (e) {
      gens.invalidate(`thin_delta of ${o.vg}/${o.name} failed: ${(e as Error).message}`);
    }
  }

  /**
   * reserve_metadata_snap; EBUSY means a metadata snapshot is held already
   * (not by this process: every reserve here is paired with a release in one
   * queue). Retried a few times in case its holder is about to release it;
   * then the failure names the held root, for the log and the fallback reason.
   */
  private async reserve(tpool: string): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      try {
        await lvm('dmsetup', ['message', tpool, '0', 'reserve_metadata_snap'], { code: 'E_TRACKER' });
        return;
      } catch (e) {
        if (!/busy/i.test((e as Error).message)) throw e;
        const status = await lvm('dmsetup', ['status', tpool], { code: 'E_TRACKER' }).catch((err: unknown) => String(err));
        this.opts.log?.warn({ pool: tpool, attempt, status: status.trim() }, 'reserve_metadata_snap: the pool holds a metadata snapshot already');
        if (attempt >= 4) throw new BlocksnapError('E_TRACKER', `${(e as Error).message} (pool status: ${status.trim()})`, { cause: e });
        await new Promise((r) => setTimeout(r, 1000 * attempt));
      }
    }
  }

  protected override async settle(): Promise<void> {
    const made = await this.snapshotOrigin().catch((e: unknown) => {
      throw toBlocksnapError(e, 'E_TRACKER');
    });
    this.pending = made.lv;
    await this.recordDelta(this.basis!, made.lv, made.bases);
  }

  protected override async drain(): Promise<void> {
    const p = this.pending;
    if (!p) return;
    await this.recordDelta(p, undefined, 'fresh');
    const old = this.basis!;
    this.basis = p;
    this.pending = null;
    await this.removeLv(old);
  }

  override async abortSwitch(): Promise<void> {
    await super.abortSwitch();
    const p = this.pending;
    this.pending = null;
    if (p) await this.removeLv(p);
  }

  private async removeLv(lv: LvInfo): Promise<void> {
    await lvm('lvremove', ['-q', '-f', `${lv.vg}/${lv.name}`], { code: 'E_TRACKER' }).catch((e: unknown) =>
      this.opts.log?.warn({ err: e, lv: lv.name }, 'cannot remove an old basis snapshot (cleanupStale removes it)'));
  }

  protected async takeCheckpoint(): Promise<TrackerCheckpoint> {
    const dev = this.dev!;
    const counters = await readIoCounters(dev.identity.major, dev.identity.minor);
    await this.recordDelta(this.pending ?? this.basis!);
    return { ...this.gens!.snapshot(), identity: dev.identity, counters, chunkSize: this.chunkSize };
  }

  /** The basis stays (it is the persistent state); a pending snapshot of an interrupted switch goes. */
  protected override async release(): Promise<void> {
    const p = this.pending;
    this.pending = null;
    if (p) await this.removeLv(p);
  }
}

/**
 * What a killed run may have left: a reserved metadata snapshot on a thin
 * pool (held_metadata_root in the pool's status), and more than one basis of
 * an origin (all but the newest). Returns what it released.
 */
export async function cleanupStaleThinDelta(): Promise<string[]> {
  const released: string[] = [];
  let all: LvInfo[];
  try {
    all = await listLvs([], { code: 'E_TRACKER' });
  } catch {
    return released; // no LVM here
  }
  for (const pool of all.filter((l) => l.segtype === 'thin-pool')) {
    const tpool = `${dmName(pool.vg, pool.name)}-tpool`;
    const status = await lvm('dmsetup', ['status', tpool], { code: 'E_TRACKER' }).catch(() => '');
    // <start> <len> thin-pool <transaction id> <used meta>/<total> <used data>/<total> <held metadata root> ...
    const held = status.trim().split(/\s+/)[6];
    if (held && held !== '-') {
      await lvm('dmsetup', ['message', tpool, '0', 'release_metadata_snap'], { code: 'E_TRACKER' });
      released.push(`metadata snapshot of ${pool.vg}/${pool.name}`);
    }
  }
  const byOrigin = new Map<string, LvInfo[]>();
  for (const l of all.filter((x) => x.tags.includes(BASIS_TAG))) {
    const k = `${l.vg}/${l.origin}`;
    byOrigin.set(k, [...(byOrigin.get(k) ?? []), l]);
  }
  for (const list of byOrigin.values()) {
    list.sort((a, b) => a.name.localeCompare(b.name));
    list.pop();
    for (const old of list) {
      await lvm('lvremove', ['-q', '-f', `${old.vg}/${old.name}`], { code: 'E_TRACKER' });
      released.push(`basis snapshot ${old.vg}/${old.name}`);
    }
  }
  return released;
}
