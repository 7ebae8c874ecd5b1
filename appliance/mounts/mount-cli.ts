/**
 * `blocksnap-appliance mounts list|show|remove` and `blocksnap-appliance
 * mount IMAGE --on AGENT` (DESIGN.md §6.2, §9), added to the CLI's program
 * by appliance/cli.ts. Mounts live only as long as the appliance process:
 * with none running there is no live mount (the next start ends what the
 * catalog still calls active), so every command asks the running appliance.
 */
import { join } from 'node:path';
import type { Command } from 'commander';
import { BlocksnapError } from '../../proto/errors.js';
import { ControlAnswerError, controlRequest } from '../../proto/shared/control-socket.js';
import { intOption } from '../../proto/shared/cli-exit.js';

interface CliCtx {
  dataDir: string;
  json: boolean;
  out: (human: string, json: unknown) => void;
}

export interface MountCliDeps {
  run: <A extends unknown[]>(fn: (...a: A) => Promise<number> | number) => (...a: A) => Promise<void>;
  ctx: (cmd: Command) => CliCtx;
  control: (dataDir: string, path: string, body: object, progressLabel: string | null) => Promise<any>;
  appliancePid: (dataDir: string) => number | null;
  controlPost: (dataDir: string, path: string, body: object) => Promise<any>;
  controlGet: (dataDir: string, path: string) => Promise<any>;
}

interface MountViewJson {
  id: string; imageRef: string; agent: string; peerAddress: string; writable: boolean; requestedBy: string; createdAt: string;
  expiresAt: string | null; state: string; endedAt: string | null; endReason: string | null; connections: number | null;
  exports: { volume: string; imageId: string; overlay: string | null }[];
}

export function addMountCommands(p: Command, d: MountCliDeps): void {
  const needRunning = (dataDir: string) => {
    if (!d.appliancePid(dataDir)) throw new BlocksnapError('E_NOT_FOUND', `no appliance is running on ${dataDir}: mounts end with the appliance process`);
  };
  const mounts = p.command('mounts').description('live mounts: images exported over NBD to agents');
  mounts.command('list').description('live mounts, newest first').option('--json', 'machine-readable output')
    .action(d.run(async (_o: unknown, cmd: Command) => {
      const c = d.ctx(cmd);
      const r = d.appliancePid(c.dataDir) ? await d.controlGet(c.dataDir, '/v1/mounts') : { nbdPort: null, mounts: [] };
      const rows = r.mounts as MountViewJson[];
      c.out(rows.map((m) => [m.id, m.imageRef, m.agent, m.writable ? 'writable' : 'read-only', `${m.connections ?? 0} conn`, m.expiresAt ?? 'no expiry', m.createdAt].join('\t')).join('\n') || '(no mounts)', rows);
      return 0;
    }));
  mounts.command('show <mount>').description('one mount: image, agent, address, expiry, overlays, connections').option('--json', 'machine-readable output')
    .action(d.run(async (id: string, _o: unknown, cmd: Command) => {
      const c = d.ctx(cmd);
      needRunning(c.dataDir);
      const m = (await d.controlPost(c.dataDir, '/v1/mounts/show', { mountId: id })) as MountViewJson;
      c.out(showMount(m), m);
      return 0;
    }));
  mounts.command('remove <mount>').description('end a mount: its NBD exports stop answering, its overlays are deleted').option('--json', 'machine-readable output')
    .action(d.run(async (id: string, _o: unknown, cmd: Command) => {
      const c = d.ctx(cmd);
      needRunning(c.dataDir);
      const m = (await d.controlPost(c.dataDir, '/v1/mounts/remove', { mountId: id })) as MountViewJson;
      c.out(`removed ${m.id}`, m);
      return 0;
    }));

  p.command('mount <image>')
    .description('mount an image (or image set) on a connected agent — any agent\'s image, e.g. a test copy of another host: ' +
      'the agent attaches it over NBD, mounts it, prepares and starts PostgreSQL; prints the connection string and the time to the first query')
    .requiredOption('--on <agent>', 'the agent that mounts it')
    .option('--port <port>', 'PostgreSQL port of the mounted copy (default: a free port)', portOption)
    .option('--target <dir>', 'directory to mount under, on the agent (default: under its state directory)')
    .option('--as-standby', 'start the copy as a standby')
    .option('--json', 'machine-readable output')
    .action(d.run(async (image: string, o: { on: string; port?: number; target?: string; asStandby?: boolean }, cmd: Command) => {
      const c = d.ctx(cmd);
      if (o.target !== undefined && !o.target.startsWith('/')) throw new BlocksnapError('E_USAGE', `--target ${o.target}: must be an absolute path (on the agent)`);
      const r = await d.control(c.dataDir, '/v1/mount', { agent: o.on, imageId: image, pgPort: o.port ?? 0, target: o.target, asStandby: !!o.asStandby }, null)
        .catch((e) => {
          if (e instanceof ControlAnswerError) return { ok: false, errorCode: e.code, errorMessage: e.message };
          throw e;
        });
      c.out(r.ok
        ? `mounted ${image} on ${o.on} as ${r.mountId} at ${r.target}\n${r.connection}\nfirst query after ${Number(r.secondsToFirstQuery).toFixed(2)} s`
        : `mount of ${image} on ${o.on} FAILED: ${r.errorCode}: ${r.errorMessage}`, r);
      return r.ok ? 0 : 1;
    }));
}

/** `images show`'s line: the live mounts of the image (none when no appliance runs: mounts end with it). */
export async function mountedLine(dataDir: string, imageId: string, running: boolean): Promise<{ line: string; mounts: string[] }> {
  if (!running) return { line: 'mounted:     no', mounts: [] };
  const r = await controlRequest<{ mounts: MountViewJson[] }>(join(dataDir, 'control.sock'), 'GET', '/v1/mounts');
  const ids = r.mounts.filter((m) => m.exports.some((x) => x.imageId === imageId)).map((m) => m.id);
  return { line: `mounted:     ${ids.length ? `yes (${ids.join(', ')})` : 'no'}`, mounts: ids };
}

function showMount(m: MountViewJson): string {
  return [
    `mount:       ${m.id} (${m.state}${m.endReason ? `: ${m.endReason}` : ''})`,
    `image:       ${m.imageRef}`, `agent:       ${m.agent} at ${m.peerAddress} (asked by ${m.requestedBy})`,
    `mode:        ${m.writable ? 'writable (copy-on-write overlay)' : 'read-only'}`, `created:     ${m.createdAt}`,
    `expires:     ${m.expiresAt ?? 'never'}`, `connections: ${m.connections ?? 0}`,
    ...m.exports.map((x) => `  ${x.volume}: image ${x.imageId}${x.overlay ? `, overlay ${x.overlay}` : ''}`),
  ].join('\n');
}

const portOption = intOption(1, 65535);
