/**
 * The control-socket routes of retention (DESIGN.md §12), served by the
 * running appliance (control-server.ts adds them):
 *
 *   POST /v1/images/delete {imageId, dryRun?}        → {dryRun, removed}
 *   POST /v1/prune {agent?, volume?, keep, dryRun?}  → {prune, gc}   (a GC runs after a prune that removed images)
 *   POST /v1/gc {dryRun?}                            → GcResult
 *   GET  /v1/store/usage                             → StoreUsage
 */
import type { ControlRoutes } from '../../proto/shared/control-socket.js';
import type { KeepOptions } from './prune-policy.js';
import type { Retention } from './retention-service.js';

export function retentionRoutes(retention: () => Retention): ControlRoutes {
  return {
    'POST /v1/images/delete': async ({ body }) => {
      const r = await retention().deleteImage(String(body.imageId ?? ''), { dryRun: body.dryRun === true });
      const gc = r.dryRun ? null : await retention().gc({});
      return { ...r, gc };
    },
    'POST /v1/prune': async ({ body }) => {
      const keep = (body.keep ?? {}) as KeepOptions;
      const prune = await retention().prune({
        agent: body.agent === undefined ? undefined : String(body.agent), volume: body.volume === undefined ? undefined : String(body.volume),
        keep, dryRun: body.dryRun === true,
      });
      const gc = !prune.dryRun && prune.removed.length ? await retention().gc({}) : null;
      return { prune, gc };
    },
    'POST /v1/gc': async ({ body }) => retention().gc({ dryRun: body.dryRun === true }),
    'GET /v1/store/usage': async () => retention().usage(),
  };
}
