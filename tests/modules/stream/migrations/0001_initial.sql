-- The events tests' streams: each append takes the next number of its stream under the head's
-- row lock (so a stream's numbers are in commit order), and logs what it emitted.
CREATE TABLE IF NOT EXISTS stream_heads (
    stream text PRIMARY KEY,
    n      integer NOT NULL
);
CREATE TABLE IF NOT EXISTS stream_log (
    id     uuid PRIMARY KEY,  -- the event's id, as emit returned it
    stream text    NOT NULL,
    n      integer NOT NULL
);
