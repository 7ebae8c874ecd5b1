/**
 * Retention commands on a stopped appliance (`gc`, `prune`, `images delete`
 * with no appliance running): the CLI takes the data directory's lock (so no
 * appliance starts meanwhile), does what the appliance does at start
 * (deletions finished, roll-forward, uncommitted packs removed), and runs
 * the same Retention the appliance would.
 */
import { join } from 'node:path';
import type { Logger } from 'pino';
import type { ApplianceBackends } from '../server/appliance.js';
import { takeDataDirLock } from '../server/data-lock.js';
import { openCatalogOrRecover, rollForward } from '../server/recovery.js';
import { finishDeletions } from './retention-catalog.js';
import { Retention } from './retention-service.js';

export async function withOfflineRetention<T>(dataDir: string, backends: ApplianceBackends, log: Logger, fn: (r: Retention) => Promise<T>): Promise<T> {
  const lock = takeDataDirLock(dataDir, 'retention');
  try {
    const { catalog, rebuilt } = await openCatalogOrRecover(dataDir, log);
    try {
      const where = { dataDir, storeDir: join(dataDir, 'store'), logger: log };
      const store = await backends.openChunkStore(where);
      try {
        const manifests = backends.openManifestStore(where);
        await finishDeletions(catalog, manifests);
        await rollForward(catalog, manifests, rebuilt !== null, log);
        await store.resolvePending((root) => catalog.hasRoot(root));
        return await fn(new Retention({ catalog, store, manifests, log }));
      } finally {
        await store.close();
      }
    } finally {
      catalog.close();
    }
  } finally {
    lock.release();
  }
}
