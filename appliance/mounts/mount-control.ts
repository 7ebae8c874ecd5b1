/**
 * The control-socket routes of mounts (appliance/server/control-server.ts):
 * what `blocksnap-appliance mounts list|show|remove` and
 * `blocksnap-appliance mount IMAGE --on AGENT` ask a running appliance.
 */
import { BlocksnapError } from '../../proto/errors.js';
import type { ControlRoutes } from '../../proto/shared/control-socket.js';
import type { Appliance } from '../server/appliance.js';
import type { MountRow } from './mount-catalog.js';

/** A mount as the CLI shows it: the row, its live NBD connections; export names are secrets and stay out. */
export function mountView(m: MountRow, connections: number | null) {
  const { exports, ...rest } = m;
  return { ...rest, connections, exports: exports.map(({ exportName: _secret, ...x }) => x) };
}

export function mountRoutes(app: Appliance): ControlRoutes {
  const view = (m: MountRow) => mountView(m, m.state === 'active' ? app.mounts.connectionsOf(m.id) : 0);
  return {
    'GET /v1/mounts': () => ({ nbdPort: app.nbdPort, mounts: app.mounts.mounts.list().map(view) }),
    'POST /v1/mounts/show': ({ body }) => {
      const m = app.mounts.mounts.get(String(body.mountId ?? ''));
      if (!m) throw new BlocksnapError('E_NOT_FOUND', `no mount ${String(body.mountId ?? '')}`);
      return view(m);
    },
    // The agent unmounts first (its PostgreSQL stops cleanly), then the export goes.
    'POST /v1/mounts/remove': async ({ body }) => view(await app.mountProtocol.removeGracefully(String(body.mountId ?? ''), 'removed by operator')),
    'POST /v1/mount': async ({ body, events }) => {
      const agent = String(body.agent ?? '');
      const imageId = String(body.imageId ?? '');
      const pgPort = body.pgPort === undefined ? 0 : Number(body.pgPort);
      if (!Number.isInteger(pgPort) || pgPort < 0 || pgPort > 65535) throw new BlocksnapError('E_USAGE', '"pgPort" must be 0..65535');
      const target = body.target === undefined ? '' : String(body.target);
      if (target !== '' && !target.startsWith('/')) throw new BlocksnapError('E_USAGE', '"target" must be an absolute path');
      const { requestId, result } = app.mountProtocol.runMount(agent, {
        imageId, pgPort, target, asStandby: body.asStandby === true, writable: body.writable !== false,
      });
      events()({ event: 'started', requestId, agent, imageId });
      // The CLI going away does not undo the mount: like a backup, it outlives the terminal.
      return await result;
    },
  };
}
