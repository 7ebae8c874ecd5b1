/**
 * The retention commands of `blocksnap-appliance` (DESIGN.md §12, README):
 * `images delete|pin|unpin`, `prune`, `policies set|list|show|remove`, `gc`,
 * `store usage`. Work that removes data goes to the running appliance's
 * control socket; with no appliance running the CLI takes the data
 * directory's lock and does it itself (offline-retention.ts). Pins and
 * policies are catalog rows: written directly either way.
 */
import type { Command } from 'commander';
import type { Logger } from 'pino';
import { intOption } from '../../proto/shared/cli-exit.js';
import { BlocksnapError } from '../../proto/errors.js';
import type { Catalog } from '../catalog/catalog.js';
import type { ApplianceBackends } from '../server/appliance.js';
import type { GcResult } from './gc.js';
import { KEEP_KINDS, type KeepOptions } from './prune-policy.js';
import { RetentionCatalog, type PolicyRow } from './retention-catalog.js';
import type { PruneResult, Retention, StoreUsage } from './retention-service.js';

export interface RetentionCliDeps {
  run: <A extends unknown[]>(fn: (...a: A) => Promise<number> | number) => (...a: A) => Promise<void>;
  ctx: (cmd: Command) => { dataDir: string; json: boolean; out: (human: string, json: unknown) => void; withCatalog: <T>(fn: (c: Catalog) => T) => T };
  /** The running appliance's pid, or null. */
  appliancePid: (dataDir: string) => number | null;
  /** A request to the running appliance's control socket. */
  request: (dataDir: string, method: 'GET' | 'POST', path: string, body?: object) => Promise<any>;
  /** Loaded when a command needs them (the CLI's start-up stays small). */
  backends: () => Promise<ApplianceBackends>;
  log: () => Promise<Logger>;
  fmtBytes: (n: number) => string;
}

type KeepFlags = { keepLast?: number; keepHourly?: number; keepDaily?: number; keepWeekly?: number; keepMonthly?: number; keepYearly?: number };

function keepOptions(cmd: Command): Command {
  for (const k of KEEP_KINDS) cmd.option(`--keep-${k} <n>`, k === 'last' ? 'keep the N newest images' : `keep the newest image of each of the last N ${k === 'daily' ? 'days' : k.replace(/ly$/, 's')} that have one (UTC)`, intOption(0));
  return cmd;
}

function keepOf(o: KeepFlags): KeepOptions {
  return { last: o.keepLast, hourly: o.keepHourly, daily: o.keepDaily, weekly: o.keepWeekly, monthly: o.keepMonthly, yearly: o.keepYearly };
}

function keepText(k: KeepOptions): string {
  return KEEP_KINDS.filter((n) => (k[n] ?? 0) > 0).map((n) => `keep-${n} ${k[n]}`).join(', ') || '(none)';
}

export function addRetentionCommands(p: Command, images: Command, store: Command, d: RetentionCliDeps): void {
  const { run, ctx } = d;
  /** Online through the appliance, offline under the data directory's lock. */
  const viaAppliance = async <T>(dataDir: string, method: 'GET' | 'POST', path: string, body: object, offline: (r: Retention) => Promise<T>): Promise<T> => {
    if (d.appliancePid(dataDir)) return d.request(dataDir, method, path, body);
    const { withOfflineRetention } = await import('./offline-retention.js');
    return withOfflineRetention(dataDir, await d.backends(), await d.log(), offline);
  };

  images.command('delete <image>').description('delete an image (with its whole image set); its space comes back at the GC that follows. Refused while pinned, mounted, in use or the basis of a running job')
    .option('--dry-run', 'say what would be deleted, delete nothing').option('--json', 'machine-readable output')
    .action(run(async (id: string, o: { dryRun?: boolean }, cmd: Command) => {
      const c = ctx(cmd);
      const r = await viaAppliance(c.dataDir, 'POST', '/v1/images/delete', { imageId: id, dryRun: !!o.dryRun }, async (ret) => {
        const del = await ret.deleteImage(id, { dryRun: !!o.dryRun });
        return { ...del, gc: del.dryRun ? null : await ret.gc({}) };
      });
      c.out([`${r.dryRun ? 'would delete' : 'deleted'}: ${r.removed.join(' ')}`, ...(r.gc ? [gcLine(r.gc, d.fmtBytes)] : [])].join('\n'), r);
      return 0;
    }));
  for (const [name, pin] of [['pin', true], ['unpin', false]] as const) {
    images.command(`${name} <image>`).description(pin ? 'protect an image (and its image set) from delete and prune' : 'remove the protection of `images pin`')
      .option('--json', 'machine-readable output')
      .action(run(async (id: string, _o: unknown, cmd: Command) => {
        const c = ctx(cmd);
        const { pinImage } = await import('./retention-service.js');
        const rows = c.withCatalog((cat) => pinImage(cat, id, pin));
        c.out(`${pin ? 'pinned' : 'unpinned'}: ${rows.map((i) => i.id).join(' ')}`, { pinned: pin, images: rows.map((i) => i.id) });
        return 0;
      }));
  }

  keepOptions(p.command('prune').description('remove images by retention options (Proxmox Backup Server semantics, UTC), per volume; image sets kept or removed whole; then a GC')
    .option('--agent <a>', 'only this agent\'s volumes').option('--volume <v>', 'only this volume')
    .option('--dry-run', 'say what would be kept and removed, remove nothing').option('--json', 'machine-readable output'))
    .action(run(async (o: KeepFlags & { agent?: string; volume?: string; dryRun?: boolean }, cmd: Command) => {
      const c = ctx(cmd);
      const keep = keepOf(o);
      if (!KEEP_KINDS.some((k) => (keep[k] ?? 0) > 0)) throw new BlocksnapError('E_USAGE', 'prune needs at least one --keep-… option above 0 (see --help)');
      const body = { agent: o.agent, volume: o.volume, keep, dryRun: !!o.dryRun };
      const r: { prune: PruneResult; gc: GcResult | null } = await viaAppliance(c.dataDir, 'POST', '/v1/prune', body, async (ret) => {
        const prune = await ret.prune(body);
        return { prune, gc: !prune.dryRun && prune.removed.length ? await ret.gc({}) : null };
      });
      const lines = r.prune.images.map((l) => `${l.action === 'keep' ? 'keep  ' : r.prune.dryRun ? 'would remove' : 'remove'}\t${l.imageId}\t${l.agent}/${l.volume}\t${l.createdAt}\t${l.reason}`);
      if (r.gc) lines.push(gcLine(r.gc, d.fmtBytes));
      c.out(lines.join('\n') || '(no images)', r);
      return 0;
    }));

  const policies = p.command('policies').description('per-volume retention policies, applied after every successful backup of the volume');
  const agentOf = (cat: Catalog, volume: string, agent?: string): string => {
    if (agent) return agent;
    const agents = [...new Set([...cat.listImages({ volume }).map((i) => i.agent),
      ...new RetentionCatalog(cat).policies().filter((x) => x.volume === volume).map((x) => x.agent)])];
    if (agents.length === 1) return agents[0]!;
    throw new BlocksnapError('E_USAGE', agents.length ? `volume ${volume} exists on agents ${agents.join(', ')}: give --agent` : `no images of volume ${volume} yet: give --agent`);
  };
  keepOptions(policies.command('set <volume>').description('set the volume\'s policy (replaces the previous one)').option('--agent <a>', 'the volume\'s agent (needed when several have that volume name)')
    .option('--json', 'machine-readable output'))
    .action(run(async (volume: string, o: KeepFlags & { agent?: string }, cmd: Command) => {
      const c = ctx(cmd);
      const { setPolicy } = await import('./retention-service.js');
      const row = c.withCatalog((cat) => setPolicy(cat, agentOf(cat, volume, o.agent), volume, keepOf(o)));
      c.out(policyLine(row), row);
      return 0;
    }));
  policies.command('list').description('every policy').option('--json', 'machine-readable output')
    .action(run((_o: unknown, cmd: Command) => {
      const c = ctx(cmd);
      const rows = c.withCatalog((cat) => new RetentionCatalog(cat).policies());
      c.out(rows.map(policyLine).join('\n') || '(no policies)', rows);
      return 0;
    }));
  policies.command('show <volume>').description('one volume\'s policy').option('--agent <a>', 'the volume\'s agent').option('--json', 'machine-readable output')
    .action(run((volume: string, o: { agent?: string }, cmd: Command) => {
      const c = ctx(cmd);
      const row = c.withCatalog((cat) => new RetentionCatalog(cat).policy(agentOf(cat, volume, o.agent), volume));
      if (!row) throw new BlocksnapError('E_NOT_FOUND', `no policy for volume ${volume}`);
      c.out(policyLine(row), row);
      return 0;
    }));
  policies.command('remove <volume>').description('remove the volume\'s policy (nothing is pruned after its backups any more)').option('--agent <a>', 'the volume\'s agent')
    .option('--json', 'machine-readable output')
    .action(run((volume: string, o: { agent?: string }, cmd: Command) => {
      const c = ctx(cmd);
      const removed = c.withCatalog((cat) => new RetentionCatalog(cat).removePolicy(agentOf(cat, volume, o.agent), volume));
      if (!removed) throw new BlocksnapError('E_NOT_FOUND', `no policy for volume ${volume}`);
      c.out(`removed the policy of ${volume}`, { removed });
      return 0;
    }));

  p.command('gc').description('garbage collection: mark what live images need, delete packs with nothing live, rewrite packs under 50 % live')
    .option('--dry-run', 'mark and report what would be reclaimed, change nothing').option('--json', 'machine-readable output')
    .action(run(async (o: { dryRun?: boolean }, cmd: Command) => {
      const c = ctx(cmd);
      const r: GcResult = await viaAppliance(c.dataDir, 'POST', '/v1/gc', { dryRun: !!o.dryRun }, (ret) => ret.gc({ dryRun: !!o.dryRun }));
      c.out(gcLine(r, d.fmtBytes), r);
      return 0;
    }));
  store.command('usage').description('physical and logical bytes, dedup ratio, reclaimable bytes (from the last GC mark), per volume').option('--json', 'machine-readable output')
    .action(run(async (_o: unknown, cmd: Command) => {
      const c = ctx(cmd);
      const u: StoreUsage = await viaAppliance(c.dataDir, 'GET', '/v1/store/usage', {}, (ret) => ret.usage());
      const f = d.fmtBytes;
      c.out([
        `physical:    ${f(u.physicalBytes)} in ${u.packs} packs (${u.blobs} blobs)`,
        `logical:     ${f(u.logicalBytes)} in ${u.images} images (every image is a full map)`,
        `dedup ratio: ${u.dedupRatio.toFixed(2)}`,
        `reclaimable: ${u.reclaimableBytes === null ? 'unknown (no GC mark yet: run gc --dry-run)' : `${f(u.reclaimableBytes)} at the last mark (${u.lastMarkAt})`}`,
        ...u.volumes.map((v) => `  ${v.agent}/${v.volume}: ${v.images} images, ${f(v.logicalBytes)} logical, ${v.referencedBytesAt ? `${f(v.referencedBytes)} stored bytes referenced at the last mark` : 'not marked yet'}`),
      ].join('\n'), u);
      return 0;
    }));
}

function policyLine(r: PolicyRow): string {
  return `${r.agent}/${r.volume}\t${keepText(r.keep)}\t(updated ${r.updatedAt})`;
}

function gcLine(r: GcResult, f: (n: number) => string): string {
  return `gc${r.dryRun ? ' (dry run)' : ''}: ${r.images} live images, ${r.liveBlobs} live / ${r.deadBlobs} dead blobs (${f(r.deadBytes)} dead); `
    + `${r.packsDeleted} packs ${r.dryRun ? 'to delete' : 'deleted'}, ${r.packsRewritten} ${r.dryRun ? 'to rewrite' : 'rewritten'}; `
    + `${r.dryRun ? `${f(r.reclaimableBytes)} reclaimable` : `${f(r.reclaimedBytes)} reclaimed`}; store ${f(r.bytesBefore)} → ${f(r.dryRun ? r.bytesBefore : r.bytesAfter)}; `
    + `mark ${r.markSeconds.toFixed(2)} s, sweep ${r.sweepSeconds.toFixed(2)} s`;
}
