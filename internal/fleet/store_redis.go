package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// redisStore is the Store of gateway replicas that share a Redis: a prompt
// queued through one replica is known to all (its owner server and id
// there, its client and owner, its body until it is done), and so is who
// made each file. It keeps what the memory store keeps: every active
// record, the newest maxDone done ones, the newest maxFiles file owners.
//
// Keys, under prefix + "fleet:":
//
//	prompts        hash: id → the record (JSON)
//	placements     hash: placement (server, its id) → id
//	active         set of the ids not done
//	done           sorted set of the done ids, in the order they finished (for trimming)
//	finished       sorted set of the done ids by Finished (Unix µs), for FinishedSince
//	owner:<owner>  set of the ids an owner queued
//	files          hash: file → owner
//	files-order    sorted set of the files, oldest first (for trimming)
//	seq            counter that orders done and files-order
//
// Every change is one Lua script, so a record and its indexes never
// disagree, whichever replicas write at once. The scripts touch keys they
// compute (owner sets, when trimming), so the store needs one Redis (or a
// primary with replicas), not a Redis Cluster.
type redisStore struct {
	rdb      redis.UniversalClient
	prefix   string
	maxDone  int
	maxFiles int
}

// NewRedisStore returns a Store in Redis under keys that start with
// prefix (redisstate.Prefix) + "fleet:", remembering up to maxDone
// finished prompts (0: 100,000), as NewMemoryStore.
func NewRedisStore(rdb redis.UniversalClient, prefix string, maxDone int) Store {
	if maxDone <= 0 {
		maxDone = 100_000
	}
	return &redisStore{rdb: rdb, prefix: prefix + "fleet:", maxDone: maxDone, maxFiles: maxFiles}
}

func (s *redisStore) key(name string) string { return s.prefix + name }

// placementField and fileField name a placement or a file as a hash field:
// each part but the last prefixed with its length, so that no server name
// or file name can make two of them collide. putScript builds the same
// placement fields in Lua.
func placementField(server, sid string) string {
	return strconv.Itoa(len(server)) + ":" + server + sid
}

func fileField(f File) string {
	return strconv.Itoa(len(f.Server)) + ":" + f.Server +
		strconv.Itoa(len(f.Type)) + ":" + f.Type +
		strconv.Itoa(len(f.Subfolder)) + ":" + f.Subfolder + f.Filename
}

func storeErr(err error) error { return fmt.Errorf("prompt store: %w", err) }

// putScript stores a record and its indexes, and forgets the oldest done
// records past the limit (as memoryStore.forget: the record, its current
// and stale placements that still point to it, and its index entries).
//
// KEYS: prompts, placements, active, done, finished, seq, the owner's set.
// ARGV: id, record, done (1/0), Finished in µs ("" when zero), maxDone,
// the prefix of owner sets, then the placement fields (current, stale…).
var putScript = redis.NewScript(`
local prompts, placements, active, done, finished, seq, owned = unpack(KEYS)
local id = ARGV[1]
redis.call('HSET', prompts, id, ARGV[2])
for i = 7, #ARGV do redis.call('HSET', placements, ARGV[i], id) end
redis.call('SADD', owned, id)
if ARGV[3] ~= '1' then
  redis.call('SADD', active, id)
  redis.call('ZREM', done, id)
  redis.call('ZREM', finished, id)
  return 0
end
redis.call('SREM', active, id)
if ARGV[4] ~= '' then
  redis.call('ZADD', finished, ARGV[4], id)
else
  redis.call('ZREM', finished, id)
end
if redis.call('ZSCORE', done, id) then return 0 end
redis.call('ZADD', done, redis.call('INCR', seq), id)
local over = redis.call('ZCARD', done) - tonumber(ARGV[5])
if over <= 0 then return 0 end
local old = redis.call('ZPOPMIN', done, over)
for i = 1, #old, 2 do
  local oid = old[i]
  local v = redis.call('HGET', prompts, oid)
  if v then
    local p = cjson.decode(v)
    if p.Done == true then
      redis.call('HDEL', prompts, oid)
      redis.call('ZREM', finished, oid)
      local pls = {{p.Server, p.ServerID}}
      if type(p.Stale) == 'table' then
        for _, st in ipairs(p.Stale) do pls[#pls + 1] = {st.Server, st.ServerID} end
      end
      for _, pl in ipairs(pls) do
        local f = string.len(pl[1]) .. ':' .. pl[1] .. pl[2]
        if redis.call('HGET', placements, f) == oid then redis.call('HDEL', placements, f) end
      end
      redis.call('SREM', ARGV[6] .. p.Owner, oid)
    end
  end
end
return 0
`)

func (s *redisStore) Put(ctx context.Context, p Prompt) error {
	rec, err := json.Marshal(p)
	if err != nil {
		return storeErr(err)
	}
	done, finished := "0", ""
	if p.Done {
		done = "1"
		if !p.Finished.IsZero() {
			finished = strconv.FormatInt(p.Finished.UnixMicro(), 10)
		}
	}
	args := []any{p.ID, rec, done, finished, s.maxDone, s.key("owner:"), placementField(p.Server, p.ServerID)}
	for _, st := range p.Stale {
		args = append(args, placementField(st.Server, st.ServerID))
	}
	keys := []string{s.key("prompts"), s.key("placements"), s.key("active"), s.key("done"),
		s.key("finished"), s.key("seq"), s.key("owner:" + p.Owner)}
	if err := putScript.Run(ctx, s.rdb, keys, args...).Err(); err != nil {
		return storeErr(err)
	}
	return nil
}

func decodePrompt(v string) (Prompt, error) {
	var p Prompt
	if err := json.Unmarshal([]byte(v), &p); err != nil {
		return Prompt{}, storeErr(fmt.Errorf("a record does not decode: %w", err))
	}
	return p, nil
}

func (s *redisStore) Get(ctx context.Context, id string) (Prompt, bool, error) {
	v, err := s.rdb.HGet(ctx, s.key("prompts"), id).Result()
	return s.one(v, err)
}

func (s *redisStore) one(v string, err error) (Prompt, bool, error) {
	if errors.Is(err, redis.Nil) {
		return Prompt{}, false, nil
	}
	if err != nil {
		return Prompt{}, false, storeErr(err)
	}
	p, err := decodePrompt(v)
	if err != nil {
		return Prompt{}, false, err
	}
	return p, true, nil
}

// byServerIDScript: KEYS placements, prompts; ARGV the placement field.
var byServerIDScript = redis.NewScript(`
local id = redis.call('HGET', KEYS[1], ARGV[1])
if not id then return false end
return redis.call('HGET', KEYS[2], id)
`)

func (s *redisStore) ByServerID(ctx context.Context, server, sid string) (Prompt, bool, error) {
	v, err := byServerIDScript.Run(ctx, s.rdb, []string{s.key("placements"), s.key("prompts")}, placementField(server, sid)).Text()
	return s.one(v, err)
}

// membersScript returns the records of the ids in a set that still have
// one. KEYS: the set, prompts.
var membersScript = redis.NewScript(`
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v = redis.call('HGET', KEYS[2], id)
  if v then out[#out + 1] = v end
end
return out
`)

func (s *redisStore) members(ctx context.Context, set string) ([]Prompt, error) {
	vs, err := membersScript.Run(ctx, s.rdb, []string{set, s.key("prompts")}).StringSlice()
	if err != nil {
		return nil, storeErr(err)
	}
	return decodeAll(vs)
}

func decodeAll(vs []string) ([]Prompt, error) {
	out := make([]Prompt, 0, len(vs))
	for _, v := range vs {
		p, err := decodePrompt(v)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

func (s *redisStore) Active(ctx context.Context) ([]Prompt, error) {
	ps, err := s.members(ctx, s.key("active"))
	if err != nil {
		return nil, err
	}
	// The set and the records change together, but a record's Done is
	// what counts.
	out := ps[:0]
	for _, p := range ps {
		if !p.Done {
			out = append(out, p)
		}
	}
	return out, nil
}

func (s *redisStore) Owned(ctx context.Context, owner string) ([]Prompt, error) {
	ps, err := s.members(ctx, s.key("owner:"+owner))
	if err != nil {
		return nil, err
	}
	out := ps[:0]
	for _, p := range ps {
		if p.Owner == owner {
			out = append(out, p)
		}
	}
	return out, nil
}

// finishedScript returns the records finished at or after a time.
// KEYS: finished, prompts; ARGV: the time in Unix µs.
var finishedScript = redis.NewScript(`
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')) do
  local v = redis.call('HGET', KEYS[2], id)
  if v then out[#out + 1] = v end
end
return out
`)

func (s *redisStore) FinishedSince(ctx context.Context, server string, since time.Time) ([]Prompt, error) {
	vs, err := finishedScript.Run(ctx, s.rdb, []string{s.key("finished"), s.key("prompts")}, since.UnixMicro()).StringSlice()
	if err != nil {
		return nil, storeErr(err)
	}
	ps, err := decodeAll(vs)
	if err != nil {
		return nil, err
	}
	out := ps[:0]
	for _, p := range ps {
		// The index is to the microsecond; the record is exact.
		if p.Done && p.Server == server && !p.Finished.IsZero() && !p.Finished.Before(since) {
			out = append(out, p)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Finished.After(out[j].Finished) }) // newest first
	return out, nil
}

// putFileScript records a file's owner and forgets the oldest files past
// the limit. KEYS: files, files-order, seq; ARGV: the file field, the
// owner, maxFiles.
var putFileScript = redis.NewScript(`
if redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), ARGV[1])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #old, 2 do redis.call('HDEL', KEYS[1], old[i]) end
end
return 1
`)

func (s *redisStore) PutFile(ctx context.Context, f File, owner string) error {
	err := putFileScript.Run(ctx, s.rdb, []string{s.key("files"), s.key("files-order"), s.key("seq")},
		fileField(f), owner, s.maxFiles).Err()
	if err != nil && !errors.Is(err, redis.Nil) {
		return storeErr(err)
	}
	return nil
}

func (s *redisStore) FileOwner(ctx context.Context, f File) (string, bool, error) {
	o, err := s.rdb.HGet(ctx, s.key("files"), fileField(f)).Result()
	if errors.Is(err, redis.Nil) {
		return "", false, nil
	}
	if err != nil {
		return "", false, storeErr(err)
	}
	return o, true, nil
}

var _ Store = (*redisStore)(nil)
