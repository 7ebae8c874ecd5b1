/**
 * `blocksnap-appliance verify IMAGE --restore --on AGENT` (issue 9 item 8):
 * proves an image restores. The image (or image set) is mounted on the agent
 * through the appliance-triggered mount (RunMount{verify}, DESIGN.md §4.5):
 * the agent attaches it over NBD, starts PostgreSQL, runs amcheck and a row
 * count of every table on the copy (agent/mount/restore-check.ts), unmounts
 * and answers MountResult{check}. The result is recorded with the image
 * (catalog migration 7) and shown by `images show`.
 *
 * Failed = the mount failed (PostgreSQL did not start, the WAL could not be
 * fetched, …) or the check found a problem; the reason is recorded.
 */
import { BlocksnapError } from '../../proto/errors.js';
import type { MountResult } from '../../proto/messages.js';
import type { ControlRoutes } from '../../proto/shared/control-socket.js';
import type { Catalog } from '../catalog/catalog.js';
import type { MountProtocol } from '../mounts/mount-protocol.js';
import type { MountManager } from '../mounts/mount-manager.js';

export interface RestoreVerification {
  imageId: string;
  agent: string;
  verifiedAt: string;
  ok: boolean;
  /** Why it failed; null when ok. */
  reason: string | null;
  /** From the request to the agent's answer (mount, check and unmount). */
  seconds: number;
  mountId: string;
  secondsToFirstQuery: number;
  check: MountResult['check'] | null;
}

export interface VerifyRestoreDeps {
  catalog: Catalog;
  mountProtocol: MountProtocol;
  mounts: MountManager;
}

export async function verifyRestore(d: VerifyRestoreDeps, imageRef: string, agent: string, timeoutMs?: number): Promise<RestoreVerification> {
  const members = d.mounts.imagesOf(imageRef).map((i) => i.id); // unknown or damaged: refused here
  const started = process.hrtime.bigint();
  const { result } = d.mountProtocol.runMount(agent, { imageId: imageRef, pgPort: 0, target: '', asStandby: false, writable: true, verify: true }, timeoutMs);
  const r = await result;
  // The agent unmounts before it answers; a mount still live here (its unmount failed) goes now.
  if (r.mountId && d.mounts.mounts.get(r.mountId)?.state === 'active') {
    await d.mountProtocol.removeGracefully(r.mountId, 'verify --restore done');
  }
  const v: RestoreVerification = {
    imageId: imageRef, agent, verifiedAt: new Date().toISOString(), ok: false, reason: null,
    seconds: Number(process.hrtime.bigint() - started) / 1e9, mountId: r.mountId, secondsToFirstQuery: r.secondsToFirstQuery, check: r.check ?? null,
  };
  if (!r.ok) v.reason = `mount failed: ${r.errorCode}: ${r.errorMessage}`;
  else if (!r.check) v.reason = 'the agent answered no check (an agent without verify --restore support?)';
  else if (!r.check.ok) v.reason = `check found ${r.check.problems.length} problem(s): ${r.check.problems.slice(0, 3).map((p) => `${p.database}${p.relation ? `/${p.relation}` : ''}: ${p.message}`).join('; ')}`;
  else v.ok = true;
  for (const id of new Set([imageRef, ...members])) {
    if (d.catalog.image(id)) recordRestoreVerification(d.catalog, { ...v, imageId: id });
  }
  return v;
}

export function recordRestoreVerification(catalog: Catalog, v: RestoreVerification): void {
  catalog.database.prepare(`INSERT INTO restore_verifications (image_id, verified_at, agent, ok, reason, result) VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (image_id, verified_at) DO UPDATE SET agent = excluded.agent, ok = excluded.ok, reason = excluded.reason, result = excluded.result`)
    .run(v.imageId, v.verifiedAt, v.agent, v.ok ? 1 : 0, v.reason, JSON.stringify(v));
}

/** The newest restore verification of an image, or null if it was never verified that way. */
export function lastRestoreVerification(catalog: Catalog, imageId: string): RestoreVerification | null {
  const row = catalog.database.prepare('SELECT result FROM restore_verifications WHERE image_id = ? ORDER BY verified_at DESC LIMIT 1')
    .pluck().get(imageId) as string | undefined;
  return row ? (JSON.parse(row) as RestoreVerification) : null;
}

/** `images show`'s line. */
export function restoreVerificationLine(v: RestoreVerification | null): string {
  if (!v) return 'restorable:  not verified (verify IMAGE --restore --on AGENT)';
  const c = v.check;
  const rows = c ? c.tables.reduce((n, t) => n + Number(t.rows), 0) : 0;
  const what = c ? `${c.tables.length} tables, ${rows} rows, ${c.heapsChecked} heaps and ${c.indexesChecked} indexes checked` : 'no check';
  return v.ok
    ? `restorable:  verified OK ${v.verifiedAt} on ${v.agent}: ${what}, first query after ${v.secondsToFirstQuery.toFixed(2)} s`
    : `restorable:  verification FAILED ${v.verifiedAt} on ${v.agent}: ${v.reason}`;
}

/** The control-socket route (appliance/server/control-server.ts): `POST /v1/verify-restore {imageId, agent}` → started, result. */
export function verifyRestoreRoutes(app: VerifyRestoreDeps): ControlRoutes {
  return {
    'POST /v1/verify-restore': async ({ body, events }) => {
      const imageId = String(body.imageId ?? '');
      const agent = String(body.agent ?? '');
      if (!imageId || !agent) throw new BlocksnapError('E_USAGE', '"imageId" and "agent" are required');
      const run = verifyRestore(app, imageId, agent);
      events()({ event: 'started', imageId, agent });
      // The CLI going away does not stop the verification: it is recorded anyway.
      return await run;
    },
  };
}
