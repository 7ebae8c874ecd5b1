import type { Logger } from 'pino';
import { BlocksnapError } from '../../proto/errors.js';
import { ControlSocketServer, type ControlRoutes } from '../../proto/shared/control-socket.js';
import { exportImageTo } from '../ops/export-image.js';
import { verifyImage } from '../ops/verify-image.js';
import { recordVerifyReport } from './recovery.js';
import { mountRoutes } from '../mounts/mount-control.js';
import { verifyRestoreRoutes } from '../ops/verify-restore.js';
import { retentionRoutes } from '../retention/retention-routes.js';
import type { Appliance } from './appliance.js';

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
 *   GET  /v1/mounts                        live mounts (with their NBD connections)
 *   POST /v1/mounts/remove {mountId}       ends a mount (appliance/mounts/mount-manager.ts) → the ended row
 *   POST /v1/mount {agent, imageId, pgPort?, target?, asStandby?, writable?}  → started, result (a MountResult)
 *   POST /v1/verify-restore {imageId, agent}  → started, result (appliance/ops/verify-restore.ts)
 *   errors                                 → 4xx/5xx or a last line {event: 'error', code, message} (proto/shared/control-socket)
 */
export class ControlServer {
  private constructor(private readonly server: ControlSocketServer) {}

  /** We hold the data directory's lock: a socket file already at `path` is stale and replaced. */
  static async listen(path: string, app: Appliance, log: Logger): Promise<ControlServer> {
    return new ControlServer(await ControlSocketServer.listen(path, routes(app), log));
  }

  close(): Promise<void> {
    return this.server.close();
  }
}

function routes(app: Appliance): ControlRoutes {
  const exportOrVerify = (what: 'export' | 'verify'): ControlRoutes[string] => async ({ body, events }) => {
    const imageId = body.imageId === undefined ? undefined : String(body.imageId);
    const images = imageId ? [app.catalog.image(imageId)] : app.catalog.listImages();
    if (images.some((i) => !i) || images.length === 0) throw new BlocksnapError('E_NOT_FOUND', `no image ${imageId ?? '(none)'}`);
    if (what === 'export' && (typeof body.to !== 'string' || !body.to.startsWith('/'))) throw new BlocksnapError('E_USAGE', '"to" must be an absolute path');
    const write = events();
    const progress = (done: number, total: number) => write({ event: 'progress', chunksDone: done, chunksTotal: total });
    // Leased while we read them: delete and prune leave them alone (DESIGN.md §12.1).
    return app.retention.leases.with(images.map((i) => i!.id), what, async () => {
    if (what === 'export') {
      // Checked before a byte is written; the data directory is never a target.
      const r = await exportImageTo(app.store, images[0]!, body.to as string, { force: body.force === true, dataDir: app.opts.dataDir, onProgress: progress });
      return { ok: true, ...r };
    }
    const reports = [];
    for (const img of images) {
      const r = await verifyImage(app.store, app.manifests, img!.id, img!.rootDigest, progress);
      recordVerifyReport(app.catalog, r); // damaged images are marked (never a basis), DESIGN.md §6.1
      reports.push(r);
    }
    return { ok: reports.every((r) => r.ok), reports };
    });
  };
  return {
    'GET /v1/agents': () => app.router.connectedAgents(),
    'POST /v1/agents/end': ({ body }) => {
      // After `agents rotate`: nothing authenticated with the old token goes on.
      const ended = app.endAgent(String(body.agent ?? ''), String(body.reason ?? 'ended by operator'));
      return { ok: true, ended };
    },
    'POST /v1/cancel': ({ body }) => {
      app.router.cancelJob(String(body.jobId ?? ''), 'cancelled by operator');
      return { ok: true };
    },
    'POST /v1/backup': async ({ body, events }) => {
      const job = app.router.startJob(String(body.agent ?? ''), String(body.volume ?? ''), body.full ? 'full' : 'incremental',
        body.audit === undefined ? {} : { audit: !!body.audit });
      const write = events();
      write({ event: 'started', jobId: job.id });
      const onProgress = (p: unknown) => write({ event: 'progress', ...(p as object) });
      job.on('progress', onProgress);
      // The CLI going away does not cancel the job: backups outlive terminals.
      const outcome = await job.done;
      job.off('progress', onProgress);
      // The volumes' retention policies, then a GC, in the background (DESIGN.md §12.1).
      if (outcome.ok) void app.retention.afterBackup(job.agent, job.members);
      return outcome;
    },
    'POST /v1/export': exportOrVerify('export'),
    'POST /v1/verify': exportOrVerify('verify'),
    ...mountRoutes(app),
    ...verifyRestoreRoutes(app),
    ...retentionRoutes(() => app.retention),
  };
}
