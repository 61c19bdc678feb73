-- The log's row images and written fields are kept as `json`: the text exactly as written, only
-- checked to be JSON. Postgres parsed every `jsonb` image into a tree and rebuilt it in binary
-- on every merge, which cost more than writing the entry; nothing queries inside them. Keys stay
-- `jsonb`, so they still compare with `=`. Other writers' trigger still builds `jsonb` images,
-- stored through the assignment cast.
alter table synchub.change_log
    alter column new_row type json,
    alter column old_values type json,
    alter column written type json;
