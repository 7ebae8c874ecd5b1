/**
 * Where the appliance's ports get their implementations (the CLI's `serve`
 * and the test fixtures compose here; nothing below names a concrete store
 * or listener). A new backend — an S3-compatible object store for manifests
 * and packs, another listener — is one new module and one line in a map
 * below.
 *
 * What an offline command (verify, export, catalog rebuild, prune without a
 * running appliance) does not use is imported when `serve` listens: the
 * WebSocket listener (ws) and the NBD server.
 */
import type { ApplianceBackends, StoreContext } from './server/appliance.js';
import { nbdMountBackend } from './mounts/nbd-mount-backend.js';
import type { RecoveringChunkStore } from './store/chunk-store.js';
import { FsChunkStore } from './store/fs-chunk-store.js';
import { FsManifestStore } from './store/fs-manifest-store.js';
import type { ManifestStore } from './store/manifest-store.js';

export const chunkStores: Record<string, (ctx: StoreContext) => Promise<RecoveringChunkStore>> = {
  fs: (c) => FsChunkStore.open(c.storeDir, { logger: c.logger, dataDir: c.dataDir }),
};

export const manifestStores: Record<string, (ctx: StoreContext) => ManifestStore> = {
  fs: (c) => new FsManifestStore(c.storeDir, c.dataDir),
};

export const listeners: Record<string, ApplianceBackends['listen']> = {
  ws: async (opts, onTransport) => (await import('../proto/ws-transport.js')).WsTransportServer.listen(opts, onTransport),
};

export interface BackendChoice {
  chunks: string;
  manifests: string;
  listener: string;
}

/** The backends named by `choice` (default: packs and manifests on the filesystem, WebSocket agents). */
export function applianceBackends(choice: Partial<BackendChoice> = {}): ApplianceBackends {
  const pick = <T>(map: Record<string, T>, what: string, name: string): T => {
    const f = map[name];
    if (!f) throw new Error(`no ${what} backend ${JSON.stringify(name)} (known: ${Object.keys(map).join(', ')})`);
    return f;
  };
  return {
    openChunkStore: pick(chunkStores, 'chunk store', choice.chunks ?? 'fs'),
    openManifestStore: pick(manifestStores, 'manifest store', choice.manifests ?? 'fs'),
    listen: pick(listeners, 'listener', choice.listener ?? 'ws'),
    // Instant mounts (DESIGN.md §10): the NBD server beside the agent listener, exports from the chunk store.
    listenNbd: async (o) => (await import('./nbd/nbd-server.js')).NbdServer.start({ resolve: o.resolve, host: o.host, port: o.port, tls: o.tls, logger: o.logger }),
    mountBackend: (store) => nbdMountBackend(store),
  };
}
