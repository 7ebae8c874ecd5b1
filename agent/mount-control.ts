/**
 * The agent control socket's mount routes (agent/control-server.ts): what
 * `blocksnap-agent mount|unmount|mounts` ask the running agent, which holds
 * the session to the appliance and the LocalMounter.
 *
 *   POST /v1/mount {imageId, pgPort?, target?, asStandby?, writable?, ttlSeconds?}  → LocalMount
 *   POST /v1/unmount {mountId}                                                      → {ok, mountId}
 *   GET  /v1/mounts                                                                 → LocalMount[]
 */
import { BlocksnapError } from '../proto/errors.js';
import type { ControlRoutes } from '../proto/shared/control-socket.js';
import type { AgentMounts } from './agent-mounts.js';

const ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export function mountRoutes(mounts: AgentMounts | undefined): ControlRoutes {
  const need = (): AgentMounts => {
    if (!mounts) throw new BlocksnapError('E_NOT_FOUND', 'this agent does not mount images');
    return mounts;
  };
  return {
    'POST /v1/mount': ({ body }) => {
      const imageId = String(body.imageId ?? '');
      if (!ID.test(imageId)) throw new BlocksnapError('E_USAGE', `"imageId" ${JSON.stringify(imageId.slice(0, 80))} is not an image id`);
      const pgPort = body.pgPort === undefined ? 0 : Number(body.pgPort);
      if (!Number.isInteger(pgPort) || pgPort < 0 || pgPort > 65535) throw new BlocksnapError('E_USAGE', '"pgPort" must be 0..65535');
      const target = body.target === undefined ? undefined : String(body.target);
      if (target !== undefined && !target.startsWith('/')) throw new BlocksnapError('E_USAGE', '"target" must be an absolute path');
      const ttlSeconds = body.ttlSeconds === undefined ? 0 : Number(body.ttlSeconds);
      if (!Number.isInteger(ttlSeconds) || ttlSeconds < 0) throw new BlocksnapError('E_USAGE', '"ttlSeconds" must be an integer ≥ 0');
      return need().mount({ imageId, pgPort, target, asStandby: body.asStandby === true, writable: body.writable !== false, ttlSeconds });
    },
    'POST /v1/unmount': async ({ body }) => {
      const mountId = String(body.mountId ?? '');
      if (!ID.test(mountId)) throw new BlocksnapError('E_NOT_FOUND', `no mount ${JSON.stringify(mountId.slice(0, 80))}`);
      await need().unmount(mountId);
      return { ok: true, mountId };
    },
    'GET /v1/mounts': () => need().list(),
  };
}
