#!/usr/bin/env node
import { existsSync, readFileSync } from 'node:fs';
import { createSecureContext } from 'node:tls';
import { join, resolve } from 'node:path';
import { Command, InvalidArgumentError } from 'commander';
import { cliProgram, intOption, runCli, untilStopSignal } from '../proto/shared/cli-exit.js';
import { BlocksnapError, isBlocksnapError, toBlocksnapError } from '../proto/errors.js';
import type { Logger } from '../proto/shared/log.js';
import { ControlAnswerError, controlRequest } from '../proto/shared/control-socket.js';
import { Catalog, type ImageRow } from './catalog/catalog.js';
import { lastRestoreVerification, restoreVerificationLine } from './ops/verify-restore.js';
import { lockHolder } from './server/data-lock.js';
import { backupLine } from './backup-line.js';
import { addRetentionCommands } from './retention/retention-cli.js';
import { RetentionCatalog } from './retention/retention-catalog.js';
import { addMountCommands, mountedLine } from './mounts/mount-cli.js';

const EXIT_HELP = `
Exit status: 0 success; 1 failure; 2 usage or configuration error (the message names the bad argument);
75 busy (E_BUSY: the data directory or port is held by another process, or the volume has a job: try later).
Logs are JSON on stderr. Signals (serve): SIGTERM/SIGINT stop gracefully (running jobs are failed and
cleaned, exit 0); SIGHUP is logged and ignored (nothing to reload: every setting is a flag).`;

/*
 * Start-up cost: a CLI run loads only commander, the catalog and the control
 * socket client up front; what one command alone needs (the server, the
 * stores, export, verify, recovery, pino, the progress bar) is imported in
 * its action. Tests spawn this CLI a few hundred times: loading every
 * command's code cost ~0.3 s CPU per run.
 */
let logger: Promise<Logger> | undefined;
const appLog = (): Promise<Logger> => (logger ??= import('../proto/shared/log.js').then((m) => m.createLogger('blocksnap-appliance')));
const backends = async () => (await import('./compose.js')).applianceBackends();
const progressBar = async (label: string) => (await import('../proto/shared/progress.js')).progressBar(label);

/** The command line; each action returns the exit status. */
function program(setStatus: (s: number) => void): Command {
  const p = cliProgram('blocksnap-appliance', 'stores block-level PostgreSQL backups as virtual full images',
    ['--data <dir>', 'appliance data directory (default: $BLOCKSNAP_DATA or /var/lib/blocksnap)'], EXIT_HELP);
  const run = <A extends unknown[]>(fn: (...a: A) => Promise<number> | number) => async (...a: A) => setStatus(await fn(...a));
  const ctx = (cmd: Command): Ctx => {
    const o = cmd.optsWithGlobals<{ data?: string; json?: boolean }>();
    const dataDir = resolve(o.data ?? process.env.BLOCKSNAP_DATA ?? '/var/lib/blocksnap');
    return {
      dataDir, json: !!o.json,
      out: (human: string, json: unknown) => process.stdout.write((o.json ? JSON.stringify(json, null, 2) : human) + '\n'),
      withCatalog: <T>(fn: (c: Catalog) => T): T => {
        const c = openCatalog(dataDir);
        try {
          return fn(c);
        } finally {
          c.close();
        }
      },
    };
  };

  p.command('serve')
    .description('run the appliance: agents dial ws://HOST:PORT/v1/agent, or wss:// with a certificate (use TLS in production)')
    .option('--listen <host:port>', 'address to listen on (default 127.0.0.1:7700; port 0 = any free port)', parseListen)
    .option('--audit-every <n>', 'audit the tracker every N incrementals (default 10, 0 = off)', intOption(0))
    .option('--tls-cert <pem>', 'serve wss:// with this certificate (with --tls-key)')
    .option('--tls-key <pem>', 'the certificate\'s private key')
    .option('--nbd-listen <host:port>', 'NBD listener of mounts (default: the --listen host, its port + 1; a free port when that is 0); TLS with the same certificate', parseListen)
    .action(run(async (o: { listen?: [string, number]; auditEvery?: number; tlsCert?: string; tlsKey?: string; nbdListen?: [string, number] }, cmd: Command) => {
      const { dataDir } = ctx(cmd);
      const log = await appLog();
      const stop = untilStopSignal(log); // first: a signal during the start must not kill the process mid-way
      if (!!o.tlsCert !== !!o.tlsKey) throw usage('--tls-cert and --tls-key go together');
      const tls = o.tlsCert ? { cert: readOption('--tls-cert', o.tlsCert), key: readOption('--tls-key', o.tlsKey!) } : undefined;
      if (tls) checkTls(tls, o.tlsCert!, o.tlsKey!);
      const [host, port] = o.listen ?? ['127.0.0.1', 7700];
      // The composition point of the appliance's ports (appliance/compose.ts).
      const nbd = o.nbdListen ? { host: o.nbdListen[0], port: o.nbdListen[1] } : undefined;
      const { Appliance } = await import('./server/appliance.js');
      const app = await Appliance.open({ dataDir, logger: log, auditEvery: o.auditEvery, tls, nbd, backends: await backends() });
      const addr = await app.listen(host, port).catch(async (e) => {
        await app.close(); // releases the data directory: nothing claims it after a failed start
        throw listenError(e, `${host}:${port}`);
      });
      process.stdout.write(JSON.stringify({ event: 'listening', url: addr.url, port: addr.port, nbdPort: addr.nbdPort, pid: process.pid }) + '\n');
      const signal = await stop;
      log.info({ signal }, 'stopping: failing running jobs, closing connections');
      await app.close();
      log.info({ signal }, 'stopped');
      return 0;
    }));

  const agents = p.command('agents').description('register agents and their tokens');
  agents.command('add <name>').description('register an agent; prints its token once').option('--json', 'machine-readable output')
    .action(run((name: string, _o: unknown, cmd: Command) => {
      const c = ctx(cmd);
      const token = c.withCatalog((cat) => cat.addAgent(name));
      c.out(token, { agent: name, token });
      return 0;
    }));
  agents.command('rotate <name>').description('issue a new token (the old one stops working; a connected session of the agent is ended)')
    .option('--json', 'machine-readable output')
    .action(run(async (name: string, _o: unknown, cmd: Command) => {
      const c = ctx(cmd);
      const token = c.withCatalog((cat) => cat.rotateToken(name));
      // A running appliance ends the sessions authenticated with the old token (and their jobs).
      const sessionsEnded = await endAgentSessions(c.dataDir, name);
      c.out(token, { agent: name, token, sessionsEnded });
      return 0;
    }));
  agents.command('list').description('registered agents, and whether each is connected').option('--json', 'machine-readable output')
    .action(run(async (_o: unknown, cmd: Command) => {
      const c = ctx(cmd);
      const connected = new Map<string, string[]>();
      if (appliancePid(c.dataDir)) {
        for (const a of await controlGet(c.dataDir, '/v1/agents')) connected.set(a.agent, a.volumes);
      }
      const rows = c.withCatalog((cat) => cat.listAgents()).map((a) => ({
        ...a, connected: connected.has(a.name), volumes: connected.get(a.name) ?? [],
      }));
      c.out(rows.map((a) => `${a.name}\t${a.connected ? 'connected' : 'offline'}\t${a.volumes.join(',')}\t${a.createdAt}`).join('\n') || '(no agents)', rows);
      return 0;
    }));

  const images = p.command('images').description('committed images');
  images.command('list').description('images, oldest first').option('--agent <a>', 'only this agent\'s').option('--volume <v>', 'only this volume\'s')
    .option('--json', 'machine-readable output')
    .action(run((o: { agent?: string; volume?: string }, cmd: Command) => {
      const c = ctx(cmd);
      const imgs = c.withCatalog((cat) => cat.listImages({ agent: o.agent, volume: o.volume }));
      c.out(imgs.map((i) => [i.id, i.agent, i.volume, i.kind, fmtBytes(i.volumeSize), i.createdAt,
        ...(i.damage.length ? [`DAMAGED: ${i.damage.map((d) => d.object).join(', ')}`] : [])].join('\t')).join('\n') || '(no images)', imgs);
      return 0;
    }));
  images.command('show <image>').description('one image: transfer statistics, PostgreSQL label and LSNs, whether it is mounted').option('--json', 'machine-readable output')
    .action(run(async (id: string, _o: unknown, cmd: Command) => {
      const c = ctx(cmd);
      const [img, pinned, restoreCheck] = c.withCatalog((cat) => [cat.image(id), new RetentionCatalog(cat).pinned().has(id), lastRestoreVerification(cat, id)] as const);
      if (!img) throw new BlocksnapError('E_NOT_FOUND', `no image ${id}`);
      const mounted = await mountedLine(c.dataDir, id, appliancePid(c.dataDir) !== null);
      // Every image is a full map (DESIGN.md §3.3): deleting its basis never breaks it (§12).
      const kept = `map:         full (every chunk mapped: deleting its basis never breaks it)${pinned ? '\npinned:      yes (delete and prune leave it alone)' : ''}`;
      c.out(`${showImage(img)}\n${mounted.line}\n${kept}\n${restoreVerificationLine(restoreCheck)}`, { ...img, mounts: mounted.mounts, fullMap: true, pinned, restoreVerification: restoreCheck });
      return 0;
    }));

  const jobs = p.command('jobs').description('backup jobs');
  jobs.command('list').description('recent jobs, newest first').option('--limit <n>', 'at most N jobs', intOption(1), 100).option('--json', 'machine-readable output')
    .action(run((o: { limit: number }, cmd: Command) => {
      const c = ctx(cmd);
      const rows = c.withCatalog((cat) => cat.listJobs(o.limit));
      c.out(rows.map((j) => [j.id, j.agent, j.volumeName, j.kind, j.state, j.imageId ?? '', j.errorCode ?? ''].join('\t')).join('\n') || '(no jobs)', rows);
      return 0;
    }));
  jobs.command('cancel <job>').description('stop a running job (the agent releases its snapshot; no image)').option('--json', 'machine-readable output')
    .action(run(async (jobId: string, _o: unknown, cmd: Command) => {
      const c = ctx(cmd);
      if (!appliancePid(c.dataDir)) throw new BlocksnapError('E_NOT_FOUND', `no appliance is running on ${c.dataDir}`);
      const r = await controlPost(c.dataDir, '/v1/cancel', { jobId });
      c.out(`cancelled ${jobId}`, r);
      return 0;
    }));

  p.command('backup <agent> <volume>')
    .description('run a backup of a volume or consistency group on a connected agent and wait')
    .option('--full', 'read every chunk (default: incremental against the last image)')
    .option('--audit', 'also prove the agent\'s change tracker (0 missed chunks expected)')
    .option('--json', 'machine-readable output')
    .action(run(async (agent: string, volume: string, o: { full?: boolean; audit?: boolean }, cmd: Command) => {
      const c = ctx(cmd);
      // A job the appliance refused (unknown agent or volume, busy, …) is a failed backup, not a CLI error.
      const result = await control(c.dataDir, '/v1/backup', { agent, volume, full: !!o.full, ...(o.audit ? { audit: true } : {}) }, c.json ? null : 'backup')
        .catch((e) => {
          if (e instanceof ControlAnswerError) return { ok: false, jobId: '', errorCode: e.code, errorMessage: e.message };
          throw e;
        });
      c.out(backupLine(result), result);
      return result.ok ? 0 : 1;
    }));

  p.command('verify [image]').description('re-read and re-hash every chunk (all images if none given); exit 1 if any is bad. ' +
      'With --restore --on AGENT: mount the image on that agent, start PostgreSQL, run amcheck and count every table\'s rows, unmount; recorded with the image')
    .option('--restore', 'prove the image restores (needs --on; recorded, shown by images show)')
    .option('--on <agent>', 'with --restore: the connected agent that mounts and checks it')
    .option('--json', 'machine-readable output')
    .action(run(async (imageId: string | undefined, o: { restore?: boolean; on?: string }, cmd: Command) => {
      if (!o.restore) {
        if (o.on) throw usage('--on goes with --restore');
        return verifyOrExport(ctx(cmd), 'verify', imageId, undefined);
      }
      if (!imageId || !o.on) throw usage('verify --restore wants an image and --on AGENT');
      const c = ctx(cmd);
      const v = await control(c.dataDir, '/v1/verify-restore', { imageId, agent: o.on }, null);
      c.out(restoreVerificationLine(v).replace(/^restorable: +/, `${imageId}: restore `), v);
      return v.ok ? 0 : 1;
    }));
  p.command('export <image>')
    .description('write the image as a raw (sparse) file; for a PostgreSQL image also FILE.blocksnap.json (label, LSNs) and FILE.wal/')
    .requiredOption('--to <file>', 'the file to write (refused if it exists, is a symlink, directory or device, or is inside the data directory)')
    .option('--force', 'replace an existing regular file (and its blocksnap sidecar and WAL directory)')
    .option('--json', 'machine-readable output')
    .action(run((imageId: string, o: { to: string; force?: boolean }, cmd: Command) => verifyOrExport(ctx(cmd), 'export', imageId, resolve(o.to), !!o.force)));

  addMountCommands(p, { run, ctx, control, appliancePid, controlPost, controlGet });

  p.command('catalog').description('the catalog database')
    .command('rebuild').description('recreate the catalog\'s images from the store\'s manifests (appliance stopped); an unreadable catalog or manifest is quarantined and reported (exit 1)').option('--json', 'machine-readable output')
    .action(run(async (_o: unknown, cmd: Command) => {
      const c = ctx(cmd);
      needDataDir(c.dataDir);
      const { rebuildCatalog } = await import('./server/recovery.js');
      const r = await rebuildCatalog(c.dataDir, await backends(), await appLog());
      c.out([`catalog rebuilt: ${r.added} image(s) added from manifests`,
        ...r.quarantined.map((q) => `quarantined ${q.object} to ${q.to}: ${q.reason}`),
        ...r.damaged.map((d) => `DAMAGED ${d.imageId}: ${d.objects.map((o) => o.object).join(', ')}`)].join('\n'), r);
      return r.quarantined.length || r.damaged.length ? 1 : 0;
    }));
  const storeCmd = p.command('store').description('the chunk store');
  storeCmd.command('reindex').description('rebuild the blob index from the pack files (appliance stopped); an unreadable pack is quarantined and reported (exit 1)').option('--json', 'machine-readable output')
    .action(run(async (_o: unknown, cmd: Command) => {
      const c = ctx(cmd);
      needDataDir(c.dataDir);
      const { reindexStore } = await import('./server/recovery.js');
      const r = await reindexStore(c.dataDir, await appLog());
      c.out([`reindexed ${r.packs} packs, ${r.blobs} blobs`,
        ...r.skipped.map((k) => `skipped pack ${k.pack}${k.quarantinedTo ? ` (quarantined to ${k.quarantinedTo})` : ''}: ${k.reason}`),
        ...r.damaged.map((d) => `DAMAGED ${d.imageId}: ${d.objects.map((o) => o.object).join(', ')}`)].join('\n'), r);
      return r.skipped.length || r.damaged.length ? 1 : 0;
    }));
  // Retention (DESIGN.md §12): images delete/pin/unpin, prune, policies, gc, store usage.
  addRetentionCommands(p, images, storeCmd, {
    run, ctx, appliancePid, backends, log: appLog, fmtBytes,
    request: (dataDir, method, path, body) => (method === 'GET' ? controlGet(dataDir, path) : controlPost(dataDir, path, body ?? {})),
  });
  return p;
}

interface Ctx {
  dataDir: string;
  json: boolean;
  out: (human: string, json: unknown) => void;
  withCatalog: <T>(fn: (c: Catalog) => T) => T;
}

async function verifyOrExport(c: Ctx, cmd: 'verify' | 'export', imageId: string | undefined, to: string | undefined, force = false): Promise<number> {
  const { dataDir } = c;
  let result: any;
  if (appliancePid(dataDir)) {
    // The running appliance owns the store: ask it to do the work.
    result = await control(dataDir, `/v1/${cmd}`, { imageId, to, force }, !c.json ? cmd : null);
  } else {
    needDataDir(dataDir);
    const b = await backends();
    const where = { dataDir, storeDir: join(dataDir, 'store'), logger: await appLog() };
    const store = await b.openChunkStore(where);
    const manifests = b.openManifestStore(where);
    try {
      const images = c.withCatalog((cat) => (imageId ? [cat.image(imageId)] : cat.listImages()));
      if (images.some((i) => !i) || images.length === 0) throw new BlocksnapError('E_NOT_FOUND', `no image ${imageId ?? '(none)'}`);
      const bar = c.json ? null : await progressBar(cmd);
      const onProgress = (d: number, t: number) => bar?.update(d, t);
      if (cmd === 'export') {
        const { exportImageTo } = await import('./ops/export-image.js');
        result = { ok: true, ...(await exportImageTo(store, images[0]!, to!, { force, dataDir, onProgress })) };
      } else {
        const { verifyImage } = await import('./ops/verify-image.js');
        const { recordVerifyReport } = await import('./server/recovery.js');
        const reports = [];
        for (const img of images) {
          const r = await verifyImage(store, manifests, img!.id, img!.rootDigest, onProgress);
          c.withCatalog((cat) => recordVerifyReport(cat, r)); // damaged images are marked (never a basis)
          reports.push(r);
        }
        result = { ok: reports.every((r) => r.ok), reports };
      }
      bar?.stop();
    } finally {
      await store.close();
    }
  }
  if (c.json) {
    c.out('', cmd === 'export' ? result : result.reports);
  } else if (cmd === 'export') {
    c.out(`exported ${imageId} to ${to}: ${result.chunksWritten} chunks, ${fmtBytes(result.bytesWritten)} written, ${result.seconds.toFixed(2)} s`, result);
  } else {
    for (const r of result.reports) {
      process.stdout.write(`${r.ok ? 'ok' : 'DAMAGED'} ${r.imageId}: ${r.chunksChecked} chunks re-hashed, ${r.bad.length} bad${r.objects?.length ? `, ${r.objects.length} damaged object(s)` : ''}\n`);
      for (const o of r.objects ?? []) process.stdout.write(`  ${o.object}: ${o.code} ${o.message}\n`);
      for (const b of r.bad) process.stdout.write(`  chunk ${b.index} ${b.digest}: ${b.code} ${b.message}\n`);
    }
  }
  return result.ok ? 0 : 1;
}

/** A catalog in an existing data directory; a missing one is a usage error with a hint, not "cannot open catalog". */
function openCatalog(dataDir: string): Catalog {
  needDataDir(dataDir);
  return Catalog.open(join(dataDir, 'catalog.sqlite'));
}

function needDataDir(dataDir: string): void {
  if (!existsSync(dataDir)) {
    throw usage(`--data ${dataDir}: no such directory (the first \`blocksnap-appliance serve --data DIR\` creates it; or set BLOCKSNAP_DATA)`);
  }
}

function readOption(flag: string, file: string): Buffer {
  try {
    return readFileSync(file);
  } catch (e) {
    throw new BlocksnapError('E_USAGE', `${flag} ${file}: cannot read: ${(e as Error).message}`, { cause: e });
  }
}

/** A certificate and key that TLS cannot use (not PEM, or not a pair) are a usage error, before anything starts. */
function checkTls(tls: { cert: Buffer; key: Buffer }, certFile: string, keyFile: string): void {
  try {
    createSecureContext(tls);
  } catch (e) {
    throw new BlocksnapError('E_USAGE', `--tls-cert ${certFile} / --tls-key ${keyFile}: not a usable certificate and key: ${(e as Error).message}`, { cause: e });
  }
}

/** Why a listen failed, named by the --listen value: a busy port is E_BUSY (exit 75), a bad address a usage error. */
function listenError(e: unknown, listen: string): BlocksnapError {
  const errno = (e as NodeJS.ErrnoException)?.code;
  if (errno === 'EADDRINUSE') return new BlocksnapError('E_BUSY', `--listen ${listen}: address already in use`, { cause: e });
  if (errno === 'EADDRNOTAVAIL' || errno === 'EACCES' || errno === 'ENOTFOUND' || errno === 'EAI_AGAIN') {
    return new BlocksnapError('E_USAGE', `--listen ${listen}: cannot listen: ${errno}`, { cause: e });
  }
  return toBlocksnapError(e);
}

/** The pid holding the data directory's kernel lock (a running appliance), or null; a stale pid file does not count. */
function appliancePid(dataDir: string): number | null {
  return lockHolder(dataDir);
}

/** Asks a running appliance to end `agent`'s sessions; 0 when none runs (no control socket to reach). */
async function endAgentSessions(dataDir: string, agent: string): Promise<number> {
  if (!existsSync(join(dataDir, 'control.sock'))) return 0;
  try {
    return Number((await controlPost(dataDir, '/v1/agents/end', { agent, reason: `the token of agent ${agent} was rotated` })).ended ?? 0);
  } catch (e) {
    if (isBlocksnapError(e, 'E_DISCONNECTED')) return 0; // a socket left by a dead appliance
    throw e;
  }
}

const controlSocket = (dataDir: string) => join(dataDir, 'control.sock');

/** A one-shot JSON request to the control socket; an error answer becomes a BlocksnapError. */
function controlPost(dataDir: string, path: string, body: object): Promise<any> {
  return controlRequest(controlSocket(dataDir), 'POST', path, body);
}

function controlGet(dataDir: string, path: string): Promise<any> {
  return controlRequest(controlSocket(dataDir), 'GET', path);
}

/** A request to the running appliance's control socket; shows its progress events; resolves with the final event. */
async function control(dataDir: string, path: string, body: object, progressLabel: string | null): Promise<any> {
  if (!appliancePid(dataDir) || !existsSync(controlSocket(dataDir))) {
    throw new BlocksnapError('E_NOT_FOUND', `no appliance is running on ${dataDir}`);
  }
  const bar = progressLabel ? await progressBar(progressLabel) : null;
  try {
    return await controlRequest(controlSocket(dataDir), 'POST', path, body, {
      onEvent: (ev) => {
        if (ev.event === 'progress') bar?.update(ev.chunksDone, ev.chunksTotal);
      },
    });
  } finally {
    bar?.stop();
  }
}

function parseListen(s: string): [string, number] {
  const m = /^(.+):(\d+)$/.exec(s);
  if (!m || Number(m[2]) > 65535) throw new InvalidArgumentError('wants HOST:PORT with a port in 0..65535');
  return [m[1]!.replace(/^\[(.*)\]$/, '$1'), Number(m[2])];
}

function usage(m: string): BlocksnapError {
  return new BlocksnapError('E_USAGE', `${m} (see --help)`);
}

function showImage(img: ImageRow): string {
  const lines = [
    `image:       ${img.id}`, `agent:       ${img.agent}`, `volume:      ${img.volume} (${fmtBytes(img.volumeSize)}, chunks of ${fmtBytes(img.chunkSize)})`,
    `kind:        ${img.kind}${img.basisImageId ? ` of ${img.basisImageId}` : ''}`, `created:     ${img.createdAt}`, `job:         ${img.jobId ?? '-'}`,
    ...(img.setId ? [`set:         ${img.setId} (consistency group: restore all its members together)`] : []),
    `root:        ${img.rootDigest}`,
    ...img.damage.map((d) => `DAMAGED:     ${d.object}: ${d.reason} (since ${d.detectedAt})`),
  ];
  const st = img.stats ?? {};
  lines.push(`transfer:    ${st.chunksReceived ?? '?'} chunks received, ${st.chunksStored ?? '?'} new, ${fmtBytes(Number(st.bytesStored ?? 0))} stored, frozen ${(Number(st.freezeSeconds ?? 0) * 1000).toFixed(0)} ms`);
  const pg = img.pg as any;
  if (!pg) {
    lines.push('postgres:    none recorded (crash-consistent image)');
  } else {
    lines.push(`postgres:    ${pg.role}, server_version_num ${pg.serverVersion}, ${pg.exclusive ? 'exclusive backup (label inside the image)' : 'non-exclusive backup'}`);
    lines.push(`  start LSN ${pg.startLsn || '-'}  stop LSN ${pg.stopLsn || '-'}  timeline ${pg.timeline}${pg.replayLsn ? `  replay LSN ${pg.replayLsn}` : ''}`);
    lines.push(`  paused ${Number(pg.pausedSeconds).toFixed(3)} s, backup ${Number(pg.backupSeconds).toFixed(3)} s, WAL ${pg.wal.map((w: any) => w.name).join(' ') || 'none'}`);
    if (pg.labelFile) lines.push('  backup_label:', ...String(pg.labelFile).trimEnd().split('\n').map((l: string) => `    ${l}`));
    if (pg.spcmapFile) lines.push('  tablespace_map:', ...String(pg.spcmapFile).trimEnd().split('\n').map((l: string) => `    ${l}`));
  }
  return lines.join('\n');
}

export function fmtBytes(n: number): string {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

runCli('blocksnap-appliance', async () => {
  let status = 0;
  await program((s) => (status = s)).parseAsync(process.argv);
  return status;
});
