#!/usr/bin/env node
import { existsSync, readFileSync } from 'node:fs';
import { request } from 'node:http';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { BlocksnapError, toBlocksnapError } from '../proto/errors.js';
import { createLogger } from '../proto/log.js';
import { Catalog, type ImageRow } from './catalog/catalog.js';
import { exportImage } from './ops/export-image.js';
import { exportPgSidecar } from './ops/export-pg.js';
import type { PgImageInfo } from './store/pg-image-info.js';
import { verifyImage } from './ops/verify-image.js';
import { Appliance, pidAlive, rollForward } from './server/appliance.js';
import { FsChunkStore } from './store/fs-chunk-store.js';
import { progressBar } from './progress.js';

const HELP = `blocksnap-appliance — stores block-level PostgreSQL backups as virtual full images

Usage: blocksnap-appliance <command> [options]

Commands:
  serve --listen HOST:PORT [--audit-every N] [--tls-cert PEM --tls-key PEM]
                                      run the appliance (agents dial ws://HOST:PORT/v1/agent,
                                      or wss:// with a certificate: use TLS in production);
                                      audit the tracker every N incrementals (default 10, 0 = off)
  agents add NAME                     register an agent; prints its token once
  agents rotate NAME                  issue a new token (the old one stops working)
  agents list [--json]                registered agents
  images list [--agent A] [--volume V] [--json]
  images show IMAGE [--json]
  jobs list [--limit N] [--json]
  jobs cancel JOB                     stop a running job (the agent releases its snapshot; no image)
  backup AGENT VOLUME [--full] [--audit] [--json]
                                      run a backup on a connected agent and wait; --audit also
                                      proves the agent's change tracker (0 missed chunks expected)
  verify [IMAGE] [--json]             re-read and re-hash every chunk (all images if none given)
  export IMAGE --to FILE              write the image as a raw (sparse) file; for a PostgreSQL
                                      image also FILE.blocksnap.json (label, LSNs) and FILE.wal/
  catalog rebuild                     recreate the catalog's images from the store's manifests
  store reindex                       rebuild the blob index from the pack files

Common options:
  --data DIR     appliance data directory (default: $BLOCKSNAP_DATA or /var/lib/blocksnap)
  --help         show this help

Exit status: 0 success, 1 failure, 2 usage error. Logs are JSON on stderr.`;

const log = createLogger('blocksnap-appliance');

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      data: { type: 'string' }, listen: { type: 'string' }, json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' },
      full: { type: 'boolean' }, audit: { type: 'boolean' }, 'tls-cert': { type: 'string' }, 'tls-key': { type: 'string' }, to: { type: 'string' }, 'audit-every': { type: 'string' }, agent: { type: 'string' }, volume: { type: 'string' },
      limit: { type: 'string' },
    },
  });
  const [cmd, sub, ...rest] = positionals;
  if (values.help || !cmd) {
    process.stdout.write(HELP + '\n');
    return values.help ? 0 : 2;
  }
  const dataDir = resolve(values.data ?? process.env.BLOCKSNAP_DATA ?? '/var/lib/blocksnap');
  const out = (human: string, json: unknown) => process.stdout.write((values.json ? JSON.stringify(json, null, 2) : human) + '\n');
  const withCatalog = <T>(fn: (c: Catalog) => T): T => {
    const c = Catalog.open(join(dataDir, 'catalog.sqlite'));
    try {
      return fn(c);
    } finally {
      c.close();
    }
  };

  switch (cmd) {
    case 'serve': {
      const [host, port] = parseListen(values.listen ?? '127.0.0.1:7700');
      const auditEvery = values['audit-every'] === undefined ? undefined : Number(values['audit-every']);
      if (auditEvery !== undefined && !(Number.isInteger(auditEvery) && auditEvery >= 0)) throw usage('--audit-every wants an integer ≥ 0');
      if (!!values['tls-cert'] !== !!values['tls-key']) throw usage('--tls-cert and --tls-key go together');
      const tls = values['tls-cert'] ? { cert: readFileSync(values['tls-cert']), key: readFileSync(values['tls-key']!) } : undefined;
      const app = await Appliance.open({ dataDir, logger: log, auditEvery, tls });
      const addr = await app.listen(host, port);
      process.stdout.write(JSON.stringify({ event: 'listening', url: addr.url, port: addr.port, pid: process.pid }) + '\n');
      await new Promise<void>((res) => {
        const stop = () => res();
        process.once('SIGINT', stop);
        process.once('SIGTERM', stop);
      });
      await app.close();
      return 0;
    }
    case 'agents': {
      if (sub === 'add' || sub === 'rotate') {
        const name = need(rest[0], 'agent name');
        const token = withCatalog((c) => (sub === 'add' ? c.addAgent(name) : c.rotateToken(name)));
        out(token, { agent: name, token });
        return 0;
      }
      if (sub === 'list') {
        const connected = new Map<string, string[]>();
        if (appliancePid(dataDir)) {
          for (const c of await controlGet(dataDir, '/v1/agents')) connected.set(c.agent, c.volumes);
        }
        const agents = withCatalog((c) => c.listAgents()).map((a) => ({
          ...a, connected: connected.has(a.name), volumes: connected.get(a.name) ?? [],
        }));
        out(agents.map((a) => `${a.name}\t${a.connected ? 'connected' : 'offline'}\t${a.volumes.join(',')}\t${a.createdAt}`).join('\n') || '(no agents)', agents);
        return 0;
      }
      throw usage('agents add|rotate|list');
    }
    case 'images': {
      if (sub === 'list') {
        const imgs = withCatalog((c) => c.listImages({ agent: values.agent, volume: values.volume }));
        out(
          imgs.map((i) => [i.id, i.agent, i.volume, i.kind, fmtBytes(i.volumeSize), i.createdAt].join('\t')).join('\n') || '(no images)',
          imgs,
        );
        return 0;
      }
      if (sub === 'show') {
        const id = need(rest[0], 'image id');
        const img = withCatalog((c) => c.image(id));
        if (!img) throw new BlocksnapError('E_NOT_FOUND', `no image ${id}`);
        out(showImage(img), img);
        return 0;
      }
      throw usage('images list|show');
    }
    case 'jobs': {
      if (sub === 'cancel') {
        const jobId = need(rest[0], 'job id');
        if (!appliancePid(dataDir)) throw new BlocksnapError('E_NOT_FOUND', `no appliance is running on ${dataDir}`);
        const r = await controlPost(dataDir, '/v1/cancel', { jobId });
        out(`cancelled ${jobId}`, r);
        return 0;
      }
      if (sub !== 'list') throw usage('jobs list|cancel');
      const jobs = withCatalog((c) => c.listJobs(Number(values.limit ?? 100)));
      out(
        jobs.map((j) => [j.id, j.agent, j.volumeName, j.kind, j.state, j.imageId ?? '', j.errorCode ?? ''].join('\t')).join('\n') || '(no jobs)',
        jobs,
      );
      return 0;
    }
    case 'backup': {
      const agent = need(sub, 'agent');
      const volume = need(rest[0], 'volume');
      const ev = await control(dataDir, '/v1/backup', { agent, volume, full: !!values.full, ...(values.audit ? { audit: true } : {}) }, values.json ? null : 'backup');
      const result = ev.event === 'error' ? { ok: false, jobId: '', errorCode: ev.code, errorMessage: ev.message } : ev;
      out(
        result.ok ? `ok ${result.jobId} image ${result.imageId}` : `FAILED ${result.jobId}: ${result.errorCode} ${result.errorMessage}`,
        result,
      );
      return result.ok ? 0 : 1;
    }
    case 'verify':
    case 'export': {
      const imageId = sub;
      const to = cmd === 'export' ? resolve(need(values.to, '--to FILE')) : undefined;
      if (cmd === 'export') need(imageId, 'image id');
      let result: any;
      if (appliancePid(dataDir)) {
        // The running appliance owns the store: ask it to do the work.
        result = await control(dataDir, `/v1/${cmd}`, { imageId, to }, !values.json ? cmd : null);
        if (result.event === 'error') throw new BlocksnapError(result.code, result.message);
      } else {
        const store = await FsChunkStore.open(join(dataDir, 'store'), { logger: log });
        try {
          const images = withCatalog((c) => (imageId ? [c.image(imageId)] : c.listImages()));
          if (images.some((i) => !i) || images.length === 0) throw new BlocksnapError('E_NOT_FOUND', `no image ${imageId ?? '(none)'}`);
          const bar = values.json ? null : progressBar(cmd);
          const onProgress = (d: number, t: number) => bar?.update(d, t);
          if (cmd === 'export') {
            result = { ok: true, ...(await exportImage(store, images[0]!.rootDigest, to!, onProgress)) };
            if (images[0]!.pg) await exportPgSidecar(store, images[0]!.id, images[0]!.pg as unknown as PgImageInfo, to!);
          } else {
            const reports = [];
            for (const img of images) reports.push(await verifyImage(store, join(dataDir, 'store'), img!.id, img!.rootDigest, onProgress));
            result = { ok: reports.every((r) => r.ok), reports };
          }
          bar?.stop();
        } finally {
          await store.close();
        }
      }
      if (values.json) {
        out('', cmd === 'export' ? result : result.reports);
      } else if (cmd === 'export') {
        out(`exported ${imageId} to ${to}: ${result.chunksWritten} chunks, ${fmtBytes(result.bytesWritten)} written, ${result.seconds.toFixed(2)} s`, result);
      } else {
        for (const r of result.reports) {
          process.stdout.write(`${r.ok ? 'ok' : 'BAD'} ${r.imageId}: ${r.chunksChecked} chunks re-hashed, ${r.bad.length} bad\n`);
          for (const b of r.bad) process.stdout.write(`  chunk ${b.index} ${b.digest}: ${b.code} ${b.message}\n`);
        }
      }
      return result.ok ? 0 : 1;
    }
    case 'catalog': {
      if (sub !== 'rebuild') throw usage('catalog rebuild');
      if (appliancePid(dataDir)) throw new BlocksnapError('E_BUSY', 'stop the appliance before rebuilding its catalog');
      const n = await withCatalogAsync(dataDir, (c) => rollForward(c, join(dataDir, 'store'), true));
      out(`catalog rebuilt: ${n} image(s) added from manifests`, { added: n });
      return 0;
    }
    case 'store': {
      if (sub !== 'reindex') throw usage('store reindex');
      if (appliancePid(dataDir)) throw new BlocksnapError('E_BUSY', 'stop the appliance before reindexing its store');
      const store = await FsChunkStore.open(join(dataDir, 'store'), { logger: log });
      try {
        const r = await store.reindex();
        out(`reindexed ${r.packs} packs, ${r.blobs} blobs`, r);
      } finally {
        await store.close();
      }
      return 0;
    }
    default:
      throw usage(`unknown command ${cmd}`);
  }
}

async function withCatalogAsync<T>(dataDir: string, fn: (c: Catalog) => Promise<T>): Promise<T> {
  const c = Catalog.open(join(dataDir, 'catalog.sqlite'));
  try {
    return await fn(c);
  } finally {
    c.close();
  }
}

function appliancePid(dataDir: string): number | null {
  const f = join(dataDir, 'appliance.pid');
  if (!existsSync(f)) return null;
  const pid = Number(readFileSync(f, 'utf8').trim());
  return pid > 0 && pidAlive(pid) ? pid : null;
}

/** A one-shot JSON request to the control socket; an error answer becomes a BlocksnapError. */
function controlPost(dataDir: string, path: string, body: object): Promise<any> {
  return new Promise((resolvePromise, reject) => {
    const req = request({ socketPath: join(dataDir, 'control.sock'), path, method: 'POST', headers: { 'content-type': 'application/json' } }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('end', () => {
        let v: any;
        try {
          v = JSON.parse(text);
        } catch (e) {
          return reject(new BlocksnapError('E_PROTOCOL', 'control socket answered garbage', { cause: e }));
        }
        if (v?.event === 'error') reject(new BlocksnapError(v.code, v.message));
        else resolvePromise(v);
      });
    });
    req.on('error', (e) => reject(new BlocksnapError('E_DISCONNECTED', `control socket: ${e.message}`, { cause: e })));
    req.end(JSON.stringify(body));
  });
}

function controlGet(dataDir: string, path: string): Promise<any> {
  return new Promise((resolvePromise, reject) => {
    const req = request({ socketPath: join(dataDir, 'control.sock'), path, method: 'GET' }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => {
        try {
          resolvePromise(JSON.parse(body));
        } catch (e) {
          reject(new BlocksnapError('E_PROTOCOL', 'control socket answered garbage', { cause: e }));
        }
      });
    });
    req.on('error', (e) => reject(new BlocksnapError('E_DISCONNECTED', `control socket: ${e.message}`, { cause: e })));
    req.end();
  });
}

/** A request to the running appliance's control socket; shows its progress events; resolves with the final event. */
function control(dataDir: string, path: string, body: object, progressLabel: string | null): Promise<any> {
  const socketPath = join(dataDir, 'control.sock');
  if (!appliancePid(dataDir) || !existsSync(socketPath)) {
    return Promise.reject(new BlocksnapError('E_NOT_FOUND', `no appliance is running on ${dataDir}`));
  }
  return new Promise((resolvePromise, reject) => {
    const req = request({ socketPath, path, method: 'POST', headers: { 'content-type': 'application/json' } }, (res) => {
      const bar = progressLabel ? progressBar(progressLabel) : null;
      let buf = '';
      let result: any = null;
      res.setEncoding('utf8');
      res.on('data', (d: string) => {
        buf += d;
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (!line) continue;
          const ev = JSON.parse(line);
          if (ev.event === 'progress') bar?.update(ev.chunksDone, ev.chunksTotal);
          else if (ev.event === 'result' || ev.event === 'error') result = ev;
        }
      });
      // 'close' also fires when the appliance dies mid-response ('end' then never comes).
      res.on('close', () => {
        bar?.stop();
        if (result) resolvePromise(result);
        else reject(new BlocksnapError('E_DISCONNECTED', 'the appliance went away before the result (see its log)'));
      });
    });
    req.on('error', (e) => reject(new BlocksnapError('E_DISCONNECTED', `control socket: ${e.message}`, { cause: e })));
    req.end(JSON.stringify(body));
  });
}

function parseListen(s: string): [string, number] {
  const m = /^(.+):(\d+)$/.exec(s);
  if (!m) throw usage(`--listen wants HOST:PORT, got ${s}`);
  return [m[1]!, Number(m[2])];
}

function need<T>(v: T | undefined, what: string): T {
  if (v === undefined || v === '') throw usage(`missing ${what}`);
  return v;
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

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e) => {
    const err = toBlocksnapError(e);
    process.stderr.write(`blocksnap-appliance: ${err.code}: ${err.message}\n`);
    process.exit(err.code === 'E_USAGE' ? 2 : 1);
  },
);
