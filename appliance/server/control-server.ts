import { chmodSync, rmSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { Logger } from 'pino';
import { BlocksnapError, toBlocksnapError } from '../../proto/errors.js';
import { join } from 'node:path';
import { exportImageTo } from '../ops/export-image.js';
import { verifyImage } from '../ops/verify-image.js';
import { recordVerifyReport } from './recovery.js';
import type { Appliance } from './appliance.js';
import { readJsonBody } from '../../proto/shared/http-json.js';

/**
 * The CLI's way into a running appliance: HTTP over a Unix socket in the
 * data directory, mode 0600, so only the appliance's own user can trigger
 * jobs. Long requests (backup) answer NDJSON events as they happen.
 *
 *   GET  /v1/agents                 connected agents and their volumes
 *   POST /v1/backup {agent, volume, full, audit?}   → started, progress*, result
 *   POST /v1/cancel {jobId}
 *   POST /v1/agents/end {agent, reason}   ends the agent's sessions and jobs (after `agents rotate`) → {ok, ended}
 *   POST /v1/export {imageId, to, force?}  → progress*, result
 *   POST /v1/verify {imageId?}             → progress*, result {ok, reports}
 */
export class ControlServer {
  private constructor(private readonly http: Server, private readonly path: string) {}

  static async listen(path: string, app: Appliance, log: Logger): Promise<ControlServer> {
    rmSync(path, { force: true }); // we hold the data directory's lock: a leftover socket is stale
    const http = createServer((req, res) => {
      handle(app, req, res).catch((e) => {
        const err = toBlocksnapError(e);
        log.warn({ err: err.code, message: err.message }, 'control request failed');
        if (!res.headersSent) res.writeHead(err.code === 'E_NOT_FOUND' || err.code === 'E_UNKNOWN_VOLUME' ? 404 : 400, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ event: 'error', code: err.code, message: err.message }) + '\n');
      });
    });
    await new Promise<void>((resolve, reject) => {
      http.once('error', reject);
      http.listen(path, () => resolve());
    });
    chmodSync(path, 0o600);
    return new ControlServer(http, path);
  }

  async close(): Promise<void> {
    this.http.closeAllConnections();
    await new Promise<void>((resolve) => this.http.close(() => resolve()));
    rmSync(this.path, { force: true });
  }
}


async function handle(app: Appliance, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const url = req.url ?? '';
  if (req.method === 'GET' && url === '/v1/agents') {
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(app.router.connectedAgents()));
    return;
  }
  if (req.method === 'POST' && url === '/v1/agents/end') {
    // After `agents rotate`: nothing authenticated with the old token goes on.
    const body = await readJsonBody(req);
    const ended = app.endAgent(String(body.agent ?? ''), String(body.reason ?? 'ended by operator'));
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ ok: true, ended }) + '\n');
    return;
  }
  if (req.method === 'POST' && url === '/v1/cancel') {
    const body = await readJsonBody(req);
    app.router.cancelJob(String(body.jobId ?? ''), 'cancelled by operator');
    res.writeHead(200, { 'content-type': 'application/json' }).end('{"ok":true}\n');
    return;
  }
  if (req.method === 'POST' && url === '/v1/backup') {
    const body = await readJsonBody(req);
    const job = app.router.startJob(String(body.agent ?? ''), String(body.volume ?? ''), body.full ? 'full' : 'incremental',
      body.audit === undefined ? {} : { audit: !!body.audit });
    res.writeHead(200, { 'content-type': 'application/x-ndjson' });
    const write = (o: unknown) => res.write(JSON.stringify(o) + '\n');
    write({ event: 'started', jobId: job.id });
    const onProgress = (p: unknown) => write({ event: 'progress', ...(p as object) });
    job.on('progress', onProgress);
    // The CLI going away does not cancel the job: backups outlive terminals.
    const outcome = await job.done;
    job.off('progress', onProgress);
    res.end(JSON.stringify({ event: 'result', ...outcome }) + '\n');
    return;
  }
  if (req.method === 'POST' && (url === '/v1/export' || url === '/v1/verify')) {
    const body = await readJsonBody(req);
    const imageId = body.imageId === undefined ? undefined : String(body.imageId);
    const images = imageId ? [app.catalog.image(imageId)] : app.catalog.listImages();
    if (images.some((i) => !i) || images.length === 0) throw new BlocksnapError('E_NOT_FOUND', `no image ${imageId ?? '(none)'}`);
    res.writeHead(200, { 'content-type': 'application/x-ndjson' });
    const write = (o: unknown) => res.write(JSON.stringify(o) + '\n');
    const progress = (done: number, total: number) => write({ event: 'progress', chunksDone: done, chunksTotal: total });
    if (url === '/v1/export') {
      if (typeof body.to !== 'string' || !body.to.startsWith('/')) throw new BlocksnapError('E_USAGE', '"to" must be an absolute path');
      // Checked before a byte is written; the data directory is never a target.
      const r = await exportImageTo(app.store, images[0]!, body.to, { force: body.force === true, dataDir: app.opts.dataDir, onProgress: progress });
      res.end(JSON.stringify({ event: 'result', ok: true, ...r }) + '\n');
    } else {
      const reports = [];
      for (const img of images) {
        const r = await verifyImage(app.store, join(app.opts.dataDir, 'store'), img!.id, img!.rootDigest, progress);
        recordVerifyReport(app.catalog, r); // damaged images are marked (never a basis), DESIGN.md §6.1
        reports.push(r);
      }
      res.end(JSON.stringify({ event: 'result', ok: reports.every((r) => r.ok), reports }) + '\n');
    }
    return;
  }
  throw new BlocksnapError('E_NOT_FOUND', `no such control endpoint ${req.method} ${url}`);
}
