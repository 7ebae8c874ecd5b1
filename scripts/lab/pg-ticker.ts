import pg from 'pg';
import { BlocksnapError } from '../../proto/errors.js';
import type { PgCluster } from './pg-cluster.js';

/**
 * Test helper: one session commits ids 1, 2, 3, … into `tick(id, pad)`, each
 * insert a transaction of its own, the next one only after the previous
 * commit returned. `acked` is the last id the server acknowledged, so any
 * point-in-time image holds exactly the ids 1..k for some k ≥ the `acked`
 * read before the image's instant: a gap or a missing acknowledged id means
 * the image is not a consistent state. The pad (~900 bytes, about 8 rows per
 * heap page) makes the ticker dirty pages and write WAL at a steady pace.
 */
export const TICK_TABLE_SQL = 'CREATE TABLE IF NOT EXISTS tick (id bigint PRIMARY KEY, pad text)';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class PgTicker {
  acked = 0;
  /** Why the loop stopped early, if it did. */
  error: Error | null = null;
  private stopped = false;
  private loop: Promise<void> | null = null;

  constructor(private readonly connection: pg.ClientConfig) {}

  async start(): Promise<void> {
    const client = new pg.Client({ ...this.connection, application_name: 'test-ticker' });
    await client.connect();
    this.loop = (async () => {
      try {
        while (!this.stopped) {
          await client.query("INSERT INTO tick SELECT $1, repeat('x', 900)", [this.acked + 1]);
          this.acked++;
        }
      } catch (e) {
        this.error = e as Error;
      } finally {
        await client.end().catch(() => undefined);
      }
    })();
  }

  /** Waits until `n` ids are acknowledged. */
  async reach(n: number, timeoutMs = 60_000): Promise<number> {
    const end = Date.now() + timeoutMs;
    while (this.acked < n) {
      if (this.error) throw new BlocksnapError('E_PG', `ticker failed at ${this.acked}: ${this.error.message}`, { cause: this.error });
      if (Date.now() > end) throw new BlocksnapError('E_TIMEOUT', `ticker stuck at ${this.acked}, waiting for ${n}`);
      await sleep(10);
    }
    return this.acked;
  }

  /** Stops after the insert in flight; idempotent. */
  async stop(): Promise<void> {
    this.stopped = true;
    await this.loop;
  }
}

/** What a cluster holds of the ticker's ids. Contiguous from 1 ⇔ min = 1 and n = max. */
export async function tickIds(c: PgCluster): Promise<{ n: number; min: number; max: number }> {
  const [r] = await c.query<{ n: string; min: string; max: string }>('SELECT count(*)::text AS n, coalesce(min(id), 0)::text AS min, coalesce(max(id), 0)::text AS max FROM tick');
  return { n: Number(r!.n), min: Number(r!.min), max: Number(r!.max) };
}
