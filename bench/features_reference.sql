-- The weekly feature definitions (features issue) as one DuckDB statement: the independent
-- implementation that tests/test_features.py and bench/bench_features.py check hpcpipe against.
-- {files}: a parquet file list; {last_week}: the data set's last week (target_next_n null there).
WITH r AS (
    SELECT parent_asin, rating::DOUBLE AS rating, helpful_vote, verified_purchase, text_chars,
           CAST(date_trunc('week', epoch_ms(timestamp)) AS DATE) AS week
    FROM read_parquet({files})
), g AS (
    SELECT parent_asin, week,
           count(*) AS n_reviews,
           avg(rating) AS mean_rating,
           stddev_samp(rating) AS rating_std,
           avg(CASE WHEN rating = 5 THEN 1.0 ELSE 0.0 END) AS share_5,
           avg(CASE WHEN rating = 1 THEN 1.0 ELSE 0.0 END) AS share_1,
           sum(helpful_vote)::BIGINT AS helpful_votes,
           avg(CASE WHEN verified_purchase THEN 1.0 ELSE 0.0 END) AS verified_share,
           avg(text_chars::DOUBLE) AS mean_text_chars,
           sum(rating) AS sum_rating,
           date_diff('day', DATE '1969-12-29', week) // 7 AS wk
    FROM r GROUP BY parent_asin, week
)
SELECT parent_asin, week, n_reviews, mean_rating, rating_std, share_5, share_1, helpful_votes,
       verified_share, mean_text_chars,
       coalesce(sum(n_reviews) OVER (PARTITION BY parent_asin ORDER BY wk
                RANGE BETWEEN 1 PRECEDING AND 1 PRECEDING), 0)::BIGINT AS lag_1,
       coalesce(sum(n_reviews) OVER (PARTITION BY parent_asin ORDER BY wk
                RANGE BETWEEN 2 PRECEDING AND 2 PRECEDING), 0)::BIGINT AS lag_2,
       coalesce(sum(n_reviews) OVER (PARTITION BY parent_asin ORDER BY wk
                RANGE BETWEEN 4 PRECEDING AND 4 PRECEDING), 0)::BIGINT AS lag_4,
       sum(n_reviews) OVER (PARTITION BY parent_asin ORDER BY wk
                RANGE BETWEEN 3 PRECEDING AND CURRENT ROW) / 4.0 AS roll_mean_4,
       sum(n_reviews) OVER (PARTITION BY parent_asin ORDER BY wk
                RANGE BETWEEN 11 PRECEDING AND CURRENT ROW) / 12.0 AS roll_mean_12,
       sum(sum_rating) OVER (PARTITION BY parent_asin ORDER BY wk
                RANGE BETWEEN 11 PRECEDING AND CURRENT ROW)
         / sum(n_reviews) OVER (PARTITION BY parent_asin ORDER BY wk
                RANGE BETWEEN 11 PRECEDING AND CURRENT ROW) AS roll_rating_12,
       (wk - min(wk) OVER (PARTITION BY parent_asin))::BIGINT AS weeks_since_first,
       sum(n_reviews) OVER (PARTITION BY parent_asin ORDER BY wk
                ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)::BIGINT AS cum_reviews,
       CASE WHEN week = DATE '{last_week}' THEN NULL
            ELSE coalesce(sum(n_reviews) OVER (PARTITION BY parent_asin ORDER BY wk
                 RANGE BETWEEN 1 FOLLOWING AND 1 FOLLOWING), 0) END::BIGINT AS target_next_n
FROM g
ORDER BY parent_asin, week
